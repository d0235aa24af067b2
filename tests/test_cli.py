"""The `spp-hf` command: every command group registers in one place, and the CLI holds no library logic."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spp_hf.cli import build_parser
from spp_hf.cli import main as cli_main

CLI = Path(__file__).resolve().parent.parent / "spp_hf" / "cli"


def test_every_command_is_registered():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(subparsers.choices) == {"prune", "push", "publish", "merge", "inspect", "eval", "run"}


def test_cli_modules_have_no_import_fallbacks_or_library_classes():
    """No `except ImportError` (every dependency is installed) and no classes: logic lives in the library."""
    for path in CLI.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                assert "ImportError" not in ast.unparse(node.type), path
            assert not isinstance(node, ast.ClassDef), (path, node.name)


def test_push_base_is_for_adapters_only(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--base applies to adapters only"):
        cli_main(["push", str(folder), "user/x", "--base", "user/base"])


def test_publish_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished `spp-hf run` folder"):
        cli_main(["publish", str(tmp_path), "user/x"])
