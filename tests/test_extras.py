import sys

import pytest

from dinokit.extras import MissingExtraError, require


def test_require_returns_the_module():
    assert require("json", "json", "embed").dumps([1]) == "[1]"


def test_missing_module_names_the_extra_and_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'dinokit\[export\]' \(or pip install onnx\)"):
        require("onnx", "onnx", "export")
    assert issubclass(MissingExtraError, ImportError)
