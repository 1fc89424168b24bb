"""``--download`` without a network: the one fetch helper (file:// URLs and a patched urlopen),
MedMNIST's Zenodo download (fetch patched to serve a generated .npz), and the datasets that cannot
download (HAM10000, NIH, ImageNet) failing at once, with no network access, in one line."""

from __future__ import annotations

import hashlib
import http.client
import socket
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas  # noqa: F401  (imported up front: the timed loads below must not pay for it)
import pytest
from datafixtures import make_medmnist
from typer.testing import CliRunner

from bench.cli import app
from bench.data import download as fetching
from bench.data.base import get_dataset
from bench.data.download import DownloadError, fetch
from bench.data.medmnist import ZENODO_MD5, zenodo_source
from bench.errors import BenchError
from helpers import assert_cli_user_error

runner = CliRunner()
CANNOT = ("ham10000", "nih-chestxray", "nih-chestxray14")


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BENCH_DATA", raising=False)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt to open a URL or a connection is recorded and fails."""
    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(repr(args[:1]))
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(http.client.HTTPConnection, "connect", refuse)
    return calls


@pytest.fixture
def without_medmnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # `import medmnist` raises ImportError


def one_line(exc: pytest.ExceptionInfo[BenchError], *fragments: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- fetch -----------------------------------------------------------------------------------


def test_fetch_copies_and_checks_md5(tmp_path: Path) -> None:
    source = tmp_path / "src" / "pneumoniamnist.npz"
    make_medmnist(source)
    dest = tmp_path / "out" / "deep" / "pneumoniamnist.npz"
    assert fetch(source.as_uri(), dest, md5_of(source), timeout=5) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert leftovers(dest.parent) == ["pneumoniamnist.npz"]  # no temporary file left beside it


def test_fetch_wrong_md5_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src.npz"
    make_medmnist(source)
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as exc:
        fetch(source.as_uri(), out / "pneumoniamnist.npz", "0" * 32, timeout=5)
    one_line(exc, "refused pneumoniamnist.npz", md5_of(source), "expected " + "0" * 32, "nothing was written")
    assert leftovers(out) == []
    previous = out / "kept.npz"  # an existing destination is left as it was
    previous.write_bytes(b"old")
    with pytest.raises(DownloadError):
        fetch(source.as_uri(), previous, "0" * 32, timeout=5)
    assert previous.read_bytes() == b"old" and leftovers(out) == ["kept.npz"]


@pytest.mark.parametrize("error, reason", [
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "Name or service not known"),
    (urllib.error.HTTPError("https://x.invalid/f.npz", 404, "Not Found", None, None), "HTTP 404 Not Found"),
    (TimeoutError("timed out"), "timed out"),
    (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
])
def test_fetch_network_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception,
                                         reason: str) -> None:
    def fail(url: str, timeout: float) -> Any:
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    dest = tmp_path / "data" / "bloodmnist.npz"
    with pytest.raises(DownloadError) as exc:
        fetch("https://x.invalid/bloodmnist.npz", dest, timeout=1)
    one_line(exc, "cannot download bloodmnist.npz from https://x.invalid/bloodmnist.npz", reason,
             f"place the file at {dest} instead")
    assert leftovers(dest.parent) == []


class _Response:
    """A response that sends ``good`` bytes, then fails like a dropped connection."""

    headers: dict[str, str] = {"Content-Length": "100"}

    def __init__(self, good: bytes) -> None:
        self.parts = [good]

    def read(self, n: int) -> bytes:
        if self.parts:
            return self.parts.pop()
        raise http.client.IncompleteRead(b"", 90)

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def test_fetch_interrupted_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(b"x" * 10))
    with pytest.raises(DownloadError) as exc:
        fetch("https://x.invalid/a.npz", tmp_path / "a.npz")
    one_line(exc, "cannot download a.npz", "IncompleteRead")
    assert leftovers(tmp_path) == []


def test_fetch_unwritable_destination(tmp_path: Path) -> None:
    source = tmp_path / "src.npz"
    make_medmnist(source)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder must go")
    with pytest.raises(DownloadError) as exc:
        fetch(source.as_uri(), blocker / "sub" / "x.npz")
    one_line(exc, "cannot write", "x.npz")


# --- MedMNIST --------------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, Path, str | None]]:
    """fetch patched to write a generated binary MedMNIST npz; each call is recorded."""
    calls: list[tuple[str, Path, str | None]] = []

    def fake_fetch(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0, *,
                   progress: Any = None) -> Path:
        calls.append((url, Path(dest), md5))
        make_medmnist(Path(dest), "binary", seed=3)
        return Path(dest)

    monkeypatch.setattr(fetching, "fetch", fake_fetch)
    return calls


def test_medmnist_download_from_zenodo_table(tmp_path: Path, served: list, without_medmnist: None) -> None:
    path = tmp_path / "data" / "pneumoniamnist.npz"
    data = get_dataset("medmnist").load("test", path, download=True)
    assert served == [("https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1", path,
                       ZENODO_MD5["pneumoniamnist"][0])]
    assert data.dataset == "medmnist-pneumoniamnist" and len(data) > 0 and data.images.shape[1:] == (1, 28, 28)
    get_dataset("medmnist").load("train", path, download=True)  # the file is there now: nothing fetched
    assert len(served) == 1


def test_medmnist_download_sized_file(tmp_path: Path, without_medmnist: None) -> None:
    url, md5 = zenodo_source(tmp_path / "dermamnist_128.npz")
    assert url == "https://zenodo.org/records/10519652/files/dermamnist_128.npz?download=1"
    assert md5 == ZENODO_MD5["dermamnist"][2]


def test_medmnist_download_prefers_package_info(tmp_path: Path, served: list,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("medmnist")
    fake.INFO = {"pneumoniamnist": {"url_64": "https://mirror.invalid/p64.npz", "MD5_64": "ab" * 16}}  # type: ignore
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    path = tmp_path / "pneumoniamnist_64.npz"
    get_dataset("medmnist").load("val", path, download=True)
    assert served == [("https://mirror.invalid/p64.npz", path, "ab" * 16)]


def test_medmnist_download_through_real_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path with the real fetch: a file:// URL from the package table, then a wrong MD5."""
    source = tmp_path / "zenodo" / "breastmnist.npz"
    make_medmnist(source)
    fake = types.ModuleType("medmnist")
    fake.INFO = {"breastmnist": {"url": source.as_uri(), "MD5": md5_of(source)}}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    target = tmp_path / "data" / "breastmnist.npz"
    data = get_dataset("medmnist").load("test", target, download=True)
    assert target.read_bytes() == source.read_bytes() and data.dataset == "medmnist-breastmnist"
    fake.INFO["breastmnist"]["MD5"] = "f" * 32  # type: ignore[attr-defined]
    other = tmp_path / "other" / "breastmnist.npz"
    with pytest.raises(DownloadError) as exc:
        get_dataset("medmnist").load("test", other, download=True)
    one_line(exc, "refused breastmnist.npz", "expected " + "f" * 32)
    assert leftovers(other.parent) == []


def test_medmnist_download_network_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           without_medmnist: None) -> None:
    def fail(url: str, timeout: float) -> Any:
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    target = tmp_path / "octmnist.npz"
    with pytest.raises(DownloadError) as exc:
        get_dataset("medmnist").load("test", target, download=True)
    one_line(exc, "cannot download octmnist.npz from https://zenodo.org/records/10519652/files/octmnist.npz",
             "Temporary failure in name resolution", f"place the file at {target} instead")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name, fragments", [
    ("folder", ("--download needs the file to fetch", "<flag>.npz", "pneumoniamnist")),
    ("organmnist3d.npz", ("cannot download 'organmnist3d.npz'", "not a 2D MedMNIST file name")),
    ("mydata.npz", ("cannot download 'mydata.npz'",)),
    (None, ("--download needs the file to fetch", "DIR/<flag>.npz")),
])
def test_medmnist_download_needs_a_file_name(tmp_path: Path, no_network: list, without_medmnist: None,
                                             name: str | None, fragments: tuple[str, ...]) -> None:
    root = None if name is None else tmp_path / name
    if name == "folder":
        root.mkdir()  # type: ignore[union-attr]
    with pytest.raises(BenchError) as exc:
        get_dataset("medmnist").load("test", root, download=True)
    one_line(exc, *fragments)
    assert no_network == []


def test_medmnist_existing_file_is_not_fetched(tmp_path: Path, no_network: list) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    make_medmnist(path)
    assert len(get_dataset("medmnist").load("test", path, download=True)) > 0
    assert len(get_dataset("medmnist").load("test", tmp_path, download=True)) > 0  # a folder holding it
    assert no_network == []


def test_medmnist_missing_file_message_names_download(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as exc:
        get_dataset("medmnist").load("test", tmp_path / "pneumoniamnist.npz")
    one_line(exc, "does not exist", "--download")


# --- datasets that cannot download -----------------------------------------------------------


@pytest.mark.parametrize("name", CANNOT)
@pytest.mark.parametrize("root", ["empty", "absent", None])
def test_cannot_download_fails_at_once(tmp_path: Path, no_network: list, name: str, root: str | None) -> None:
    folder = None if root is None else tmp_path / root
    if root == "empty":
        folder.mkdir()  # type: ignore[union-attr]
    start = time.perf_counter()
    with pytest.raises(BenchError) as exc:
        get_dataset(name).load("test", folder, download=True)
    elapsed = time.perf_counter() - start
    url = "https://doi.org/10.7910/DVN/DBW86T" if name == "ham10000" else "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    layout = "HAM10000_images_part_1/ISIC_*.jpg" if name == "ham10000" else "images_001/images/*.png"
    where = str(folder) if folder is not None else "--data-dir"
    one_line(exc, f"dataset '{name}': --download cannot fetch it", url, f"place under {where}", layout)
    assert elapsed < 0.5, elapsed
    assert no_network == []


def test_imagenet_cannot_download(tmp_path: Path, no_network: list) -> None:
    with pytest.raises(BenchError) as exc:
        get_dataset("imagenet").load("val", tmp_path, download=True)
    one_line(exc, "--download cannot fetch it", "image-net.org")
    assert no_network == []


def test_cannot_download_is_silent_when_files_are_there(tmp_path: Path, no_network: list) -> None:
    from datafixtures import make_ham

    make_ham(tmp_path)
    assert len(get_dataset("ham10000").load("test", tmp_path, download=True)) > 0
    assert no_network == []


def test_without_download_the_message_says_where_to_get_files(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as exc:
        get_dataset("ham10000").load("test", tmp_path)
    msg = one_line(exc, "HAM10000_metadata.csv not found", "https://doi.org/10.7910/DVN/DBW86T")
    assert "--download" not in msg


def test_embedded_dataset_ignores_download(no_network: list) -> None:
    assert len(get_dataset("digits").load("test", download=True)) == 450
    assert no_network == []


def test_cifar_network_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(DownloadError) as exc:
        get_dataset("cifar10").load("test", tmp_path, download=True)
    one_line(exc, "dataset 'cifar10': cannot download its files", "Name or service not known",
             f"place them under {tmp_path} instead", "cs.toronto.edu")


def test_cli_download_of_ham10000_is_one_error_line(tmp_path: Path, no_network: list) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.perf_counter()
    result = runner.invoke(app, ["run", "--defense", "standard", "--dataset", "ham10000", "--data-dir", str(empty),
                                 "--download", "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    elapsed = time.perf_counter() - start
    assert_cli_user_error(result, "--download cannot fetch it", "https://doi.org/10.7910/DVN/DBW86T",
                          f"place under {empty}", "HAM10000_metadata.csv")
    assert elapsed < 5, elapsed
    assert no_network == []
