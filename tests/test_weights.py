"""model.pretrained=imagenet: hub-cache lookup, checksummed download, one-line errors.

A local HTTP server on 127.0.0.1 serves a small state_dict, registered under a fake backbone
entry with its hash; nothing here reaches outside the machine (conftest also guards that).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from ciscr.errors import WeightsError
from ciscr.models import factory, weights
from ciscr.models.weights import WeightFile


class _Tiny(nn.Module):
    """Stands in for a backbone: the loader needs only a state_dict."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def _payload() -> bytes:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(_Tiny().state_dict(), buf)
    return buf.getvalue()


class _Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 and counts the requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests = files, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests += 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served() -> Iterator[tuple[_Server, bytes, str]]:
    data = _payload()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    server = _Server({f"/tiny-{prefix}.pth": data, "/tiny-00000000.pth": data})
    yield server, data, prefix
    server.close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(factory.BACKBONES, "tiny", _Tiny)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _register(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "tiny", WeightFile(url))


def test_right_hash_downloads_once_into_the_hub_cache(served, cache, monkeypatch):
    server, data, prefix = served
    _register(monkeypatch, f"{server.url}/tiny-{prefix}.pth")
    model = factory.build_backbone("tiny", 16, "imagenet")
    expected = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(model.state_dict()["conv.weight"], expected["conv.weight"])
    assert (cache / f"tiny-{prefix}.pth").read_bytes() == data
    assert server.requests == 1
    factory.build_backbone("tiny", 16, "imagenet")  # second call: from the cache
    assert server.requests == 1
    assert sorted(p.name for p in cache.iterdir()) == [f"tiny-{prefix}.pth"]


def test_a_file_already_in_the_cache_is_used_without_network(served, cache, monkeypatch):
    server, data, prefix = served
    server.close()  # offline: only the cache can answer
    cache.mkdir(parents=True)
    (cache / f"tiny-{prefix}.pth").write_bytes(data)
    _register(monkeypatch, f"{server.url}/tiny-{prefix}.pth")
    path = weights.resolve_pretrained("tiny", "imagenet")
    assert path == str(cache / f"tiny-{prefix}.pth")


def test_wrong_hash_is_one_clean_line_and_nothing_is_cached(served, cache, monkeypatch):
    server, _, _ = served
    url = f"{server.url}/tiny-00000000.pth"
    _register(monkeypatch, url)
    with pytest.raises(WeightsError) as info:
        factory.build_backbone("tiny", 16, "imagenet")
    msg = str(info.value)
    assert "\n" not in msg and url in msg and "invalid hash value" in msg
    assert str(cache / "tiny-00000000.pth") in msg and "model.pretrained=PATH" in msg
    assert not cache.exists() or list(cache.iterdir()) == []  # not even a .partial file


def test_server_down_names_the_url_the_path_and_the_setting(served, cache, monkeypatch):
    server, _, prefix = served
    server.close()
    url = f"{server.url}/tiny-{prefix}.pth"
    _register(monkeypatch, url)
    with pytest.raises(WeightsError) as info:
        factory.build_backbone("tiny", 16, "imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("model.pretrained=imagenet: cannot download " + url)
    assert f"download it by hand to {cache / f'tiny-{prefix}.pth'}" in msg
    assert "model.pretrained=PATH" in msg
    assert not cache.exists() or list(cache.iterdir()) == []


def test_http_error_is_reported_too(served, cache, monkeypatch):
    server, _, _ = served
    _register(monkeypatch, f"{server.url}/tiny-12345678.pth")  # the server has no such file
    with pytest.raises(WeightsError, match="HTTP Error 404"):
        weights.resolve_pretrained("tiny", "imagenet")


def test_a_damaged_cached_file_is_refused_naming_it(served, cache, monkeypatch):
    server, data, prefix = served
    cache.mkdir(parents=True)
    bad = cache / f"tiny-{prefix}.pth"
    bad.write_bytes(data[:-10])
    _register(monkeypatch, f"{server.url}/tiny-{prefix}.pth")
    with pytest.raises(WeightsError, match=f"{re.escape(str(bad))}: SHA-256 .* delete it"):
        weights.resolve_pretrained("tiny", "imagenet")
    assert server.requests == 0


def test_local_paths_and_random_init_pass_through(tmp_path):
    assert weights.resolve_pretrained("resnet18", "") == ""
    assert weights.resolve_pretrained("resnet18", str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")


def test_a_backbone_without_named_weights_lists_the_available_ones(monkeypatch):
    monkeypatch.setitem(factory.BACKBONES, "tiny", _Tiny)
    with pytest.raises(WeightsError, match="no imagenet weights for model.backbone=tiny .*resnet101"):
        factory.build_backbone("tiny", 16, "imagenet")


def test_every_backbone_has_a_torchvision_file_with_its_hash_prefix():
    assert set(weights.IMAGENET_WEIGHTS) == set(factory.BACKBONES)
    for name, spec in weights.IMAGENET_WEIGHTS.items():
        assert spec.url.startswith("https://download.pytorch.org/models/")
        assert re.fullmatch(r"[0-9a-f]{8}", spec.hash_prefix), name


def test_the_hub_cache_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights.hub_checkpoint_dir() == tmp_path / "hub" / "checkpoints"


def test_no_test_can_reach_the_internet(cache, monkeypatch):
    _register(monkeypatch, "https://download.pytorch.org/models/tiny-12345678.pth")
    with pytest.raises(pytest.fail.Exception, match="tests must stay on this machine"):
        weights.resolve_pretrained("tiny", "imagenet")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_offline_train_exits_2_with_one_line_and_leaves_no_run_folder(served, cache, monkeypatch,
                                                                      tmp_path, capsys):
    from ciscr.cli import main

    server, _, prefix = served
    server.close()
    url = f"{server.url}/resnet18-{prefix}.pth"
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "resnet18", WeightFile(url))
    out = tmp_path / "run"
    rc = main(["train", "synthetic", "--out", str(out), "model.pretrained=imagenet",
               "data.synthetic.num_train=12", "data.synthetic.num_val=3",
               "data.synthetic.size=32", "data.labeled=4", "train.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: model.pretrained=imagenet: cannot download {url} (")
    assert str(cache / f"resnet18-{prefix}.pth") in err
    assert not out.exists()
