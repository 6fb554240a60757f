"""``convlens serve`` without the extra, and the warning for addresses beyond loopback."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from convlens.serve import INSTALL_HINT, MissingExtraError, exposure_warning, require_extra
from tests.helpers.cli import exit_code
from tests.helpers.models import tiny_net_source


def test_missing_extra_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match="uvicorn not installed"):
        require_extra()
    assert exit_code(["serve", "somewhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert INSTALL_HINT in err and "Traceback" not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_is_quiet(host: str) -> None:
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_other_addresses_warn(host: str) -> None:
    text = exposure_warning(host)
    assert text is not None and host in text and "--host 127.0.0.1" in text


def test_bad_port_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--port" in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["DIR", "--max-upload-mb", "0"], "--max-upload-mb"),
        (["DIR", "--port", "-1"], "--port"),
        (["DIR", "--device", "nonsense"], "device"),
        (["DIR", "--model", "DIR/missing.py:build"], "missing.py"),
        (["DIR/nowhere", "--model", "NET"], "nowhere does not exist"),
        (["DIR/net.py", "--model", "NET"], "net.py is not a folder"),
        (["DIR", "--model", "NET", "--port", "TAKEN"], "cannot listen on 127.0.0.1 port"),
    ],
)
def test_bad_input_is_one_line(
    args: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not {"--max-upload-mb", "-1", "nonsense"} & set(args):  # those fail while parsing
        pytest.importorskip("starlette")  # without the extra, the one line says to install it
        pytest.importorskip("uvicorn")
    (tmp_path / "net.py").write_text(tiny_net_source())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        given = [
            a.replace("NET", f"{tmp_path / 'net.py'}:build")
            .replace("DIR", str(tmp_path))
            .replace("TAKEN", port)
            for a in args
        ]
        assert exit_code(["serve", *given]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert words in err
