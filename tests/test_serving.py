"""The app served for many visitors: a real server (the app's own queue configuration, in this
process) driven over HTTP by gradio_client sessions and a raw event stream.

The slow parts are replaced by controllable stand-ins (a sampler that waits, a retrain that polls
its stop condition), so each limit is checked deterministically in seconds.
"""
import html
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from conftest import torch_threads

pytestmark = pytest.mark.server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(app):
    """(app module, url): the app's demo launched with its serving configuration."""
    port = free_port()
    app.configure(app.demo, per_session=3, per_client=5)
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.demo.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


class SlowSampler:
    """Stands in for `generate`: holds each request until released, counting the calls."""

    def __init__(self, real):
        self.real, self.release, self.calls = real, threading.Event(), 0

    def __call__(self, unet, scheduler, seeds, **kw):
        self.calls += 1
        self.release.wait(30)
        return self.real(unet, scheduler, seeds, **kw)


def wait_for(condition, timeout=20.0, what="condition"):
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_one_session_cannot_fill_the_queue(served, monkeypatch):
    app, url = served
    slow = SlowSampler(app.generate)
    monkeypatch.setattr(app, "generate", slow)
    c = client(url)
    jobs = [c.submit("single", 5000 + i, 0, 0, 1, 3, api_name="/generate_samples") for i in range(6)]
    wait_for(lambda: sum(j.done() for j in jobs) >= 3, what="the refused joins")  # refused at once
    refused = [j for j in jobs if j.done()]
    assert len(refused) == 3
    for j in refused:
        with pytest.raises(Exception, match="400"):
            j.result()
    # what the page shows: the reason, from the join's answer
    import httpx

    fn_index = next(i for i, f in app.demo.fns.items() if f.name == "generate_samples")
    r = httpx.post(url + "gradio_api/queue/join", json={"data": ["single", 1, 0, 0, 1, 3], "fn_index": fn_index,
                                                       "session_hash": c.session_hash, "event_data": None, "trigger_id": None})
    assert r.status_code == 400 and "requests waiting or running" in r.json()["detail"]
    # another visitor is not affected by the first one's backlog
    other = client(url)
    job = other.submit("single", 6000, 0, 0, 1, 3, api_name="/generate_samples")
    slow.release.set()
    assert job.result(timeout=60) is not None
    assert all(j.result(timeout=60) is not None for j in jobs if j not in refused)


def test_one_address_cannot_fill_the_queue_with_many_sessions(served, monkeypatch):
    app, url = served
    slow = SlowSampler(app.generate)
    monkeypatch.setattr(app, "generate", slow)
    sessions = [client(url) for _ in range(4)]
    jobs = [s.submit("single", 7000 + 10 * i + j, 0, 0, 1, 3, api_name="/generate_samples")
            for i, s in enumerate(sessions) for j in range(2)]
    wait_for(lambda: sum(j.done() for j in jobs) >= 3, what="the refused joins")
    assert sum(j.done() for j in jobs) == 3  # 8 asked, 5 (the per-address bound) held
    slow.release.set()
    for j in jobs:
        try:
            j.result(timeout=60)
        except Exception as e:
            assert "400" in str(e)


def test_a_client_cannot_dodge_the_per_address_bound_with_its_own_forwarded_for(served, monkeypatch):
    """With no trusted proxy (the default) X-Forwarded-For is ignored: four sessions from one address,
    each claiming another address in the header, share that address's bound."""
    from gradio_client import Client

    app, url = served
    monkeypatch.setattr(app, "TRUSTED_PROXIES", 0)
    slow = SlowSampler(app.generate)
    monkeypatch.setattr(app, "generate", slow)
    sessions = [Client(url, verbose=False, headers={"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(4)]
    jobs = [s.submit("single", 8000 + 10 * i + j, 0, 0, 1, 3, api_name="/generate_samples")
            for i, s in enumerate(sessions) for j in range(2)]
    wait_for(lambda: sum(j.done() for j in jobs) >= 3, what="the refused joins")
    assert sum(j.done() for j in jobs) == 3  # 8 asked, 5 (the per-address bound) held
    slow.release.set()
    for j in jobs:
        try:
            j.result(timeout=60)
        except Exception as e:
            assert "400" in str(e)


class PollingRetrain:
    """Stands in for `remove_and_retrain`: polls `should_stop` like training does, every step."""

    def __init__(self):
        self.started, self.stopped, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, attributor, seed, ranking, k, config=None, progress=None, should_stop=None):
        from dtrak_core.errors import Cancelled

        self.calls += 1
        self.started.set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if should_stop():
                self.stopped.set()
                raise Cancelled("stopped")
            time.sleep(0.02)
        raise AssertionError("the retrain was never told to stop")


@pytest.fixture
def polling_retrain(served, monkeypatch):
    from dtrak_core.evaluation import counterfactual

    fake = PollingRetrain()
    monkeypatch.setattr(counterfactual, "remove_and_retrain", fake)
    return fake


def test_a_cancel_sent_while_the_retrain_is_queued_is_honoured(served, polling_retrain):
    app, url = served
    first, second = client(url), client(url)
    running = first.submit(4242, 20, "square", "none", api_name="/run_counterfactual")
    assert polling_retrain.started.wait(20)
    queued = second.submit(4343, 20, "square", "none", api_name="/run_counterfactual")  # waits for the one slot
    time.sleep(0.5)
    second.predict(api_name="/cancel_retrain")
    first.predict(api_name="/cancel_retrain")
    assert polling_retrain.stopped.wait(10)
    for job in (running, queued):
        try:
            job.result(timeout=30)
        except Exception:
            pass  # Gradio may drop a cancelled event instead of returning its message
    time.sleep(0.5)
    assert polling_retrain.calls == 1  # the queued one never started training


def test_a_retrain_stops_when_its_stream_closes(served, polling_retrain):
    """Closing the page (or an API client's stream) stops the retrain and frees the slot."""
    import httpx

    app, url = served
    session = "closing-visitor"
    fn_index = next(i for i, f in app.demo.fns.items() if f.name == "run_counterfactual")
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("gradio_api/queue/join", json={"data": [4444, 20, "square", "none"], "fn_index": fn_index,
                                                    "session_hash": session, "event_data": None, "trigger_id": None})
        assert r.status_code == 200, r.text
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            assert polling_retrain.started.wait(20)
            next(stream.iter_lines())  # connected; now the visitor goes away
    assert polling_retrain.stopped.wait(15), "the retrain kept running after its stream closed"


def test_retrain_wall_time_cap(app, monkeypatch):
    from dtrak_core.evaluation import counterfactual

    fake = PollingRetrain()
    monkeypatch.setattr(counterfactual, "remove_and_retrain", fake)
    monkeypatch.setattr(app, "MAX_RETRAIN_SECONDS", 0.3)
    with torch_threads(1):
        out = app.run_counterfactual(4545, 20, "square", "none", None)
    assert fake.stopped.is_set() and out[-1].startswith("Stopped after 0 s")


def test_upload_cache_is_swept(app):
    assert app.demo.delete_cache == app.CACHE_SWEEP


def test_attribute_seed_endpoint_equals_the_core(served):
    app, url = served
    out = client(url).predict(3, 50, "square", 5, api_name="/attribute_seed")
    a = app.assets().attributor
    image = app.generate(a.unet, a.scheduler, [3], steps=50)
    expected = a.attribute(image[0], "square")
    assert [r["index"] for r in out["proponents"]] == expected.proponents(5).tolist()
    np.testing.assert_allclose([r["score"] for r in out["proponents"]], expected.scores[expected.proponents(5)], rtol=1e-5)
    with pytest.raises(Exception, match="method must be one of"):
        client(url).predict(3, 50, "no-such-method", 5, api_name="/attribute_seed")


# -- a damaged model folder --------------------------------------------------------------------------
def _copy(tiny_root, tmp_path):
    import shutil

    root = str(tmp_path / "assets")
    shutil.copytree(tiny_root, root)
    return root


def _truncate_features(root):
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    path = os.path.join(root, manifest["stores"][0], "features.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _corrupt_tracin(root):
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    manifest["tracin"] = "tracin/index.json"
    json.dump(manifest, open(os.path.join(root, "manifest.json"), "w"))
    os.makedirs(os.path.join(root, "tracin"), exist_ok=True)
    open(os.path.join(root, "tracin", "index.json"), "w").write("{ not json")


def _markdown(demo) -> str:
    return "\n".join(str(b.value) for b in demo.blocks.values() if type(b).__name__ == "Markdown")


def _edit_json(path, change):
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


@pytest.mark.parametrize("damage", ["missing folder", "truncated features", "corrupt manifest", "edited unet config",
                                    "edited noise schedule", "hand-edited recipe"])
def test_a_damaged_model_folder_gives_an_error_page(app, tiny_root, tmp_path, monkeypatch, damage):
    root = _copy(tiny_root, tmp_path)
    named = root
    if damage == "missing folder":
        root = named = str(tmp_path / "nowhere")
    elif damage == "truncated features":
        _truncate_features(root)
    elif damage == "edited unet config":  # configs and the recipe are sealed in the manifest: named, never used
        named = os.path.join(root, "model", "unet", "config.json")
        _edit_json(named, lambda c: c.update(norm_eps=0.1))
    elif damage == "edited noise schedule":
        named = os.path.join(root, "model", "scheduler", "scheduler_config.json")
        _edit_json(named, lambda c: c.update(beta_end=0.05))
    elif damage == "hand-edited recipe":
        named = os.path.join(root, "manifest.json") + " (model manifest) entry 'train_config'"
        _edit_json(os.path.join(root, "manifest.json"), lambda c: c["train_config"].update(steps=10))
    else:
        open(os.path.join(root, "manifest.json"), "w").write("{ not json")
    monkeypatch.setattr(app, "ASSETS", root)
    app.load_assets.cache_clear()
    try:
        page = _markdown(app.build_demo())
    finally:
        app.load_assets.cache_clear()
    assert "The model assets could not be loaded" in page and "How to fix it" in page and html.escape(named) in page


def test_a_damaged_optional_file_turns_its_methods_off_and_says_so(app, tiny_root, tmp_path, monkeypatch):
    root = _copy(tiny_root, tmp_path)
    _corrupt_tracin(root)
    monkeypatch.setattr(app, "ASSETS", root)
    app.load_assets.cache_clear()
    try:
        with torch_threads(1):
            page = _markdown(app.build_demo())
            a = app.load_assets(root)
    finally:
        app.load_assets.cache_clear()
    assert "tracin" not in a.methods and "square" in a.methods
    assert set(a.damaged) == {"tracin", "gas"} and "index.json" in a.damaged["tracin"]
    assert "Some files under the model folder are damaged" in page


def test_damaged_precomputed_counterfactuals_are_reported_not_dropped(app, tiny_root, tmp_path, monkeypatch):
    root = _copy(tiny_root, tmp_path)
    jobs = os.path.join(root, "counterfactual", "jobs")
    os.makedirs(jobs, exist_ok=True)
    open(os.path.join(jobs, "identity.json"), "w").write("")
    monkeypatch.setattr(app, "ASSETS", root)
    app.load_assets.cache_clear()
    app.committed.cache_clear()
    try:
        with torch_threads(1):
            page = _markdown(app.build_demo())
            banner = app.show_damage()  # after the samples: every file read
    finally:
        app.load_assets.cache_clear()
        app.committed.cache_clear()
        app.full_check.cache_clear()
    assert "precomputed counterfactuals" in page and "identity.json" in page
    assert banner.visible and "identity.json" in banner.value


def test_client_address_trusts_only_the_configured_proxy_hops(app, monkeypatch):
    """The reported defect: X-Forwarded-For was trusted from any private or loopback peer, so on a
    LAN any client could dodge the per-address limit by writing the header itself."""
    class Request:
        def __init__(self, peer, forwarded=None):
            self.client = type("Client", (), {"host": peer})()
            self.headers = {} if forwarded is None else {"x-forwarded-for": forwarded}

    # 0 trusted proxies (the default): the header is ignored, whoever the peer is
    monkeypatch.setattr(app, "TRUSTED_PROXIES", 0)
    assert app.client_address(Request("192.168.1.20", "203.0.113.5")) == "192.168.1.20"  # a LAN client's own header
    assert app.client_address(Request("127.0.0.1", "203.0.113.5")) == "127.0.0.1"
    assert app.client_address(Request("93.184.216.34", "1.2.3.4")) == "93.184.216.34"
    # 1 (a Space): the last entry, the one its proxy appended; what the client wrote lies further left
    monkeypatch.setattr(app, "TRUSTED_PROXIES", 1)
    assert app.client_address(Request("10.0.3.7", "198.51.100.9, 203.0.113.5")) == "203.0.113.5"
    assert app.client_address(Request("10.0.3.7", "203.0.113.5")) == "203.0.113.5"
    assert app.client_address(Request("10.0.3.7")) == "10.0.3.7"  # not through the proxy: the peer
    assert app.client_address(Request("10.0.3.7", " ")) == "10.0.3.7"
    # 2: the second entry from the end
    assert app.client_address(Request("10.0.0.2", "6.6.6.6, 203.0.113.5, 10.0.0.1"), proxies=2) == "203.0.113.5"
    assert app.client_address(Request("10.0.0.2", "10.0.0.1"), proxies=2) == "10.0.0.2"  # too few hops: the peer


def test_trusted_proxies_come_from_the_environment(app):
    app_module = app
    assert app_module.trusted_proxies({}) == 0
    assert app_module.trusted_proxies({"SPACE_ID": "someone/dtrak"}) == 1  # a Hugging Face Space: one proxy
    assert app_module.trusted_proxies({"DTRAK_TRUSTED_PROXIES": "2", "SPACE_ID": "someone/dtrak"}) == 2
    assert app_module.trusted_proxies({"DTRAK_TRUSTED_PROXIES": "0", "SPACE_ID": "someone/dtrak"}) == 0
    for bad in ("-1", "yes", "1.5"):
        with pytest.raises(ValueError, match=f"DTRAK_TRUSTED_PROXIES must be a whole number >= 0.*got '{bad}'"):
            app_module.trusted_proxies({"DTRAK_TRUSTED_PROXIES": bad})
