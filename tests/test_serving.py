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
    monkeypatch.setattr(app.module_of("generate"), "generate", slow)
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
    monkeypatch.setattr(app.module_of("generate"), "generate", slow)
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
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 0)
    slow = SlowSampler(app.generate)
    monkeypatch.setattr(app.module_of("generate"), "generate", slow)
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
    monkeypatch.setattr(app.module_of("MAX_RETRAIN_SECONDS"), "MAX_RETRAIN_SECONDS", 0.3)
    with torch_threads(1):
        out = app.run_counterfactual(4545, 20, "square", "none", None)
    assert fake.stopped.is_set() and out[-1].startswith("Stopped after 0 s")


def test_upload_cache_is_swept(app):
    assert app.demo.delete_cache == app.CACHE_SWEEP


def _files_under(folder) -> set:
    return {os.path.join(d, n) for d, _, names in os.walk(folder) for n in names}


def _upload(url, sizes, headers=None):
    import httpx

    files = [("files", (f"upload-{i}-{time.monotonic_ns()}.png", os.urandom(n), "image/png")) for i, n in enumerate(sizes)]
    return httpx.post(url + "gradio_api/upload", files=files, headers=headers or {}, timeout=30)


def test_uploads_are_bounded_per_address_before_they_reach_the_disk(served, monkeypatch):
    """The reported defect: one client uploaded 50 files of 10 MB in 17 s, all kept in Gradio's cache.
    Now an address's uploads are counted (files and bytes per window) before the body is written: over
    the bound, HTTP 429 with a message and Retry-After, and nothing on disk."""
    app, url = served
    limits = app.demo.upload_limits
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 0)
    monkeypatch.setattr(limits, "files", 3)
    monkeypatch.setattr(limits, "bytes", 40_000)
    monkeypatch.setattr(limits, "_recent", {})
    cache = limits.cache_dir
    for _ in range(3):
        r = _upload(url, [1000])
        assert r.status_code == 200 and os.path.isfile(r.json()[0]) and r.json()[0].startswith(cache)
    before = _files_under(cache)
    r = _upload(url, [1000], headers={"X-Forwarded-For": "203.0.113.9"})  # its own header changes nothing
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.text.startswith("Too many uploads from your address: 3 file(s)") and "the limit is 3 files" in r.text
    assert _files_under(cache) == before
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 1)  # behind one trusted proxy, the address it recorded counts
    assert _upload(url, [1000], headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 0)

    monkeypatch.setattr(limits, "_recent", {})  # bytes per window
    assert _upload(url, [30_000]).status_code == 200
    before = _files_under(cache)
    r = _upload(url, [30_000])
    assert r.status_code == 429 and "the limit is 3 files and 39 KB" in r.text and _files_under(cache) == before

    monkeypatch.setattr(limits, "_recent", {})  # files per request: counted before Gradio writes any of them
    r = _upload(url, [100] * 5)
    assert r.status_code == 429 and "this request holds 5" in r.text and _files_under(cache) == before

    monkeypatch.setattr(limits, "_recent", {})  # the per-file limit
    monkeypatch.setattr(limits, "max_request", 20_000)
    r = _upload(url, [30_000])
    assert r.status_code == 413 and "the upload limit of this server" in r.text and _files_under(cache) == before
    monkeypatch.setattr(limits, "max_request", limits.max_file_bytes + limits.FRAMING)

    monkeypatch.setattr(limits, "_recent", {})  # the whole upload cache, every visitor's
    monkeypatch.setattr(limits, "cache_bytes", limits.cache_size(max_age=0) + 500)
    r = _upload(url, [1000])
    assert r.status_code == 503 and "upload space is full" in r.text and _files_under(cache) == before


def test_uploads_within_the_bounds_reach_the_app(served, monkeypatch, tmp_path):
    """The gate passes an admitted upload to Gradio whole: the app reads the image a client uploaded."""
    from gradio_client import handle_file
    from PIL import Image

    app, url = served
    monkeypatch.setattr(app.demo.upload_limits, "_recent", {})
    path = str(tmp_path / "seven.png")
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(path)
    out = client(url).predict(handle_file(path), api_name="/read_upload")
    assert "seven.png" in json.dumps(out)


def test_refused_uploads_get_a_complete_answer_under_concurrency(served, monkeypatch):
    """The reported defect: under 8 concurrent clients a few uploads failed at the HTTP level (the
    client saw the connection close before the answer's body). Every refusal is a whole HTTP answer
    the client reads, and its connection stays usable: 8 threads, each on one keep-alive connection,
    mixing uploads over the per-file limit (answered before their body is read: the server drops
    the rest), uploads over the address's window (their body read first) and admitted ones."""
    import httpx

    app, url = served
    limits = app.demo.upload_limits
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 0)
    monkeypatch.setattr(limits, "_recent", {})
    monkeypatch.setattr(limits, "files", 4)
    monkeypatch.setattr(limits, "max_request", 50_000)
    outcomes, failures = [], []

    def visitor(i):
        with httpx.Client(base_url=url, timeout=60) as http:
            for j in range(8):
                size = 400_000 if (i + j) % 3 == 0 else 1000  # over the per-file limit, or small
                files = [("files", (f"v{i}-{j}-{time.monotonic_ns()}.png", os.urandom(size), "image/png"))]
                try:
                    r = http.post("gradio_api/upload", files=files)
                    outcomes.append((size, r.status_code, r.text))
                    assert http.get("gradio_api/info").status_code == 200  # the same connection still serves
                except Exception as e:  # a dropped connection, a body cut short
                    failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    assert len(outcomes) == 64
    assert {code for size, code, _ in outcomes if size > 50_000} == {413}
    small = [(code, text) for size, code, text in outcomes if size <= 50_000]
    assert sum(code == 200 for code, _ in small) == 4  # the address's window
    assert all(code == 429 and text.startswith("Too many uploads from your address") for code, text in small
               if code != 200)
    assert all(text.startswith("The file is over") for size, _, text in outcomes if size > 50_000)


def test_an_upload_over_the_limit_is_answered_before_its_body_arrives(served):
    """An upload that says it is over the per-file limit is answered at once, with a complete answer
    (not a connection closed on a client still sending): here the client sends a tenth of its body
    and reads the whole 413 before sending the rest."""
    import h11

    app, url = served
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    size = app.demo.upload_limits.max_request + 1_000_000
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(conn.send(h11.Request(method="POST", target="/gradio_api/upload", headers=[
            ("Host", f"127.0.0.1:{port}"), ("Content-Type", "multipart/form-data; boundary=x"),
            ("Content-Length", str(size))])))
        sock.sendall(conn.send(h11.Data(data=b"\0" * (size // 10))))
        events = []
        while not events or not isinstance(events[-1], (h11.EndOfMessage, h11.ConnectionClosed)):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            events.append(event)
    response = events[0]
    assert isinstance(response, h11.Response) and response.status_code == 413
    assert isinstance(events[-1], h11.EndOfMessage)  # the whole answer, not a connection closed under it
    body = b"".join(e.data for e in events if isinstance(e, h11.Data)).decode()
    assert body.startswith("The file is over 10 MB")


def _join(url, fn_index, data, **kw):
    import httpx

    return httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": "s" + str(
        time.monotonic_ns()), "event_data": None, "trigger_id": None}, timeout=30, **kw)


def test_a_queue_join_cannot_bring_files_past_the_upload_bounds(served, monkeypatch):
    """Files reach the app through the upload route only, where they are bounded: a queue join that
    gives a file by a web address (which Gradio would download into its cache, with no size limit
    and past every upload bound) is refused before Gradio sees it, and every other request's body
    is bounded (413 over the bound, declared or chunked)."""
    import gradio.processing_utils
    import httpx

    app, url = served
    downloads = []

    async def download(url, cache_dir):  # what Gradio would call; nothing is downloaded here
        downloads.append(url)
        raise RuntimeError("no downloads in this test")

    monkeypatch.setattr(gradio.processing_utils, "async_ssrf_protected_download", download)
    fn_index = next(i for i, f in app.demo.fns.items() if f.name == "read_upload")
    for path in ("https://huggingface.co/datasets/big/resolve/main/10GB.png", " HTTP://example.com/a.png"):
        r = _join(url, fn_index, [{"path": path, "orig_name": "a.png", "meta": {"_type": "gradio.FileData"}}])
        assert r.status_code == 400 and "given by a web address" in r.text
    assert downloads == []
    # a join with an uploaded file is let through as it came
    uploaded = _upload(url, [200])
    assert uploaded.status_code == 200
    r = _join(url, fn_index, [{"path": uploaded.json()[0], "orig_name": "a.png", "meta": {"_type": "gradio.FileData"}}])
    assert r.status_code == 200 and "event_id" in r.json()
    # the body of anything but an upload: bounded
    monkeypatch.setattr(app.demo.upload_limits, "max_call", 10_000)
    r = _join(url, fn_index, ["x" * 20_000])
    assert r.status_code == 413 and "the limit of this server" in r.text

    def chunked():
        for _ in range(4):
            yield b"[" + b"0," * 3000 + b"0]"
    r = httpx.post(url + "gradio_api/queue/join", content=chunked(), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "the limit of this server" in r.text
    monkeypatch.setattr(app.demo.upload_limits, "max_call", 1 << 20)
    assert client(url).predict(3, 50, "square", 2, api_name="/attribute_seed")["proponents"]


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


def _truncate_features(root, every=False):
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    for store in manifest["stores"] if every else manifest["stores"][:1]:
        path = os.path.join(root, store, "features.npy")
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


@pytest.mark.parametrize("damage", ["missing folder", "truncated features of every store", "corrupt manifest",
                                    "edited unet config", "edited noise schedule", "hand-edited recipe"])
def test_a_damaged_model_folder_gives_an_error_page(app, tiny_root, tmp_path, monkeypatch, damage):
    root = _copy(tiny_root, tmp_path)
    named = root
    if damage == "missing folder":
        root = named = str(tmp_path / "nowhere")
    elif damage == "truncated features of every store":  # (one damaged store turns off only its methods)
        _truncate_features(root, every=True)
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
    monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
    app.load_assets.cache_clear()
    try:
        page = _markdown(app.build_demo([root]))
    finally:
        app.load_assets.cache_clear()
    assert "The model assets could not be loaded" in page and "How to fix it" in page and html.escape(named) in page


def test_a_damaged_optional_file_turns_its_methods_off_and_says_so(app, tiny_root, tmp_path, monkeypatch):
    root = _copy(tiny_root, tmp_path)
    _corrupt_tracin(root)
    monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
    app.load_assets.cache_clear()
    try:
        with torch_threads(1):
            page = _markdown(app.build_demo([root]))
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
    monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
    app.load_assets.cache_clear()
    app.committed.cache_clear()
    try:
        with torch_threads(1):
            page = _markdown(app.build_demo([root]))
            banner = app.show_damage()  # after the samples: every file read
    finally:
        app.load_assets.cache_clear()
        app.committed.cache_clear()
        app.full_check.cache_clear()
    assert "precomputed counterfactuals" in page and "identity.json" in page
    assert banner.visible and "identity.json" in banner.value


def _flip_byte(path, offset=-1):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte ^ 0x01]))


def _page(app, root, monkeypatch):
    """(markdown of the page built on `root`, its assets or None, the banner once every file is read)."""
    monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
    for cached in (app.load_assets, app.committed, app.full_check, app.precomputed, app.outcomes):
        cached.cache_clear()
    try:
        with torch_threads(1):
            page = _markdown(app.build_demo([root]))
            try:
                a = app.load_assets(root)
            except ValueError:
                a = None
            banner = app.show_damage() if a is not None else None
    finally:
        for cached in (app.load_assets, app.committed, app.full_check, app.precomputed, app.outcomes):
            cached.cache_clear()
    return page, a, banner


def test_one_damaged_store_turns_off_only_its_methods_and_says_so(app, tiny_root, tmp_path, monkeypatch, capsys):
    """The reported defect: a bit flip in one optional store took the whole app to its error page."""
    from dtrak_core import cli
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.errors import IntegrityError

    root = _copy(tiny_root, tmp_path)
    loss = [s for s in json.load(open(os.path.join(root, "manifest.json")))["stores"] if s.startswith("stores/loss")][0]
    features = os.path.join(root, loss, "features.npy")
    _flip_byte(features)
    with pytest.raises(IntegrityError, match=f"^{features} "):  # the command line stays strict, naming the file
        Attributor.load(root)
    assert cli.main(["attribute", "--root", root, "--seed", "3", "--top", "3"]) == 2
    assert f"error: {features} " in capsys.readouterr().err
    page, a, banner = _page(app, root, monkeypatch)
    assert "The model assets could not be loaded" not in page
    assert "Some files under the model folder are damaged" in page and html.escape(features) in page
    assert a.attributor.methods == ["square"] and "square" in a.methods and "loss" not in a.methods
    needs_loss = {"gradient-dot", "gradient-cosine", "relative-ip", "renorm-ip", "journey-trak"}
    assert needs_loss <= set(a.damaged) and not needs_loss & set(a.methods)
    assert all(features in a.damaged[m] for m in needs_loss | {"loss"})
    assert "pixel-cosine" in a.methods  # what needs no store is unaffected
    assert banner.visible and html.escape(features) in banner.value


def _edit_json_file(path, change):
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


@pytest.mark.parametrize("damage", ["edited gallery.json", "truncated PNG", "removed checksums"])
def test_a_damaged_gallery_turns_off_only_the_gallery_and_says_so(app, tiny_root, tmp_path, monkeypatch, damage):
    """The reported defects: gallery.json with l2 99 was shown as a precomputed result, and a truncated
    gallery PNG failed with "image file is truncated", naming no file."""
    root = _copy(tiny_root, tmp_path)
    gallery = os.path.join(root, "counterfactual", "gallery")
    index = json.load(open(os.path.join(gallery, "gallery.json")))
    if damage == "edited gallery.json":
        named = os.path.join(gallery, "gallery.json")
        _edit_json_file(named, lambda c: c["entries"][0].update(l2=99.0))
    elif damage == "truncated PNG":
        named = os.path.join(gallery, index["entries"][0]["after_png"])
        with open(named, "r+b") as f:
            f.truncate(os.path.getsize(named) // 2)
    else:
        named = os.path.join(gallery, "checksums.json")
        os.remove(named)
    page, a, banner = _page(app, root, monkeypatch)
    assert "The model assets could not be loaded" not in page and "square" in a.methods
    assert "precomputed gallery (counterfactual/gallery)" in page and html.escape(named) in page
    assert banner.visible and html.escape(named) in banner.value and "rewrite the gallery" in banner.value
    monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
    try:
        assert app.precomputed(root) == {} and app.example_targets(root) == []  # never shown
    finally:
        app.precomputed.cache_clear()
        app.outcomes.cache_clear()


def test_damaged_benchmark_results_are_named_in_the_benchmarks_tab_and_the_banner(app, tiny_root, tmp_path,
                                                                                   monkeypatch):
    """The reported defect: an unreadable counterfactual/summary.json or benchmarks/tables.json made the
    Benchmarks section disappear with no message; an edited one was shown as it was."""
    import gradio as gr

    from dtrak_core.checksums import seal

    root = _copy(tiny_root, tmp_path)
    os.makedirs(os.path.join(root, "benchmarks"), exist_ok=True)  # (an earlier test may have made it)
    tables, summary = os.path.join(root, "benchmarks", "tables.json"), os.path.join(root, "counterfactual", "summary.json")
    study = {"validation": {"lds": 5.0, "pm": 2.0}, "generated": {"lds": 4.0, "pm": 2.0}}
    cell = {"k": 30, "ranking": "square", "method": "D-TRAK", "label_changed": 0.5,
            "l2": {"median": 2.0, "p25": 1.5, "p75": 2.5, "n": 2}, "per_target": []}
    for path, content in ((tables, {"methods": {"pixel-cosine": study}}), (summary, {"cells": [cell]})):
        with open(path, "w") as f:
            json.dump(seal(content), f)

    def tab():
        with gr.Blocks() as blocks:
            app.benchmarks_blocks(root)
        return _markdown(blocks)

    shown = tab()
    assert "## LDS of every method" in shown and "## Counterfactual" in shown and "Not shown" not in shown
    assert not app.results_damage(root)
    _edit_json_file(tables, lambda c: c["methods"]["pixel-cosine"]["validation"].update(lds=99.0))
    with open(summary, "w") as f:
        f.write('{"cells": [')
    shown = tab()
    assert shown.count("Not shown") == 2 and "99" not in shown
    assert f"{html.escape(tables)} (benchmark tables) does not match its own content_sha256" in shown
    assert f"{html.escape(summary)} (counterfactual summary) is not valid JSON" in shown
    damaged = app.results_damage(root)
    assert tables in damaged["Benchmarks: LDS tables"] and summary in damaged["Benchmarks: counterfactual summary"]
    with open(tables, "w") as f:
        json.dump({"methods": {"pixel-cosine": study}}, f)  # no checksum at all: not shown either
    assert "(benchmark tables) has no recorded checksum" in tab()
    page, a, banner = _page(app, root, monkeypatch)
    assert "Benchmarks: LDS tables" in page and "Benchmarks: counterfactual summary" in page
    assert banner.visible and html.escape(summary) in banner.value


def test_client_address_trusts_only_the_configured_proxy_hops(app, monkeypatch):
    """The reported defect: X-Forwarded-For was trusted from any private or loopback peer, so on a
    LAN any client could dodge the per-address limit by writing the header itself."""
    class Request:
        def __init__(self, peer, forwarded=None):
            self.client = type("Client", (), {"host": peer})()
            self.headers = {} if forwarded is None else {"x-forwarded-for": forwarded}

    # 0 trusted proxies (the default): the header is ignored, whoever the peer is
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 0)
    assert app.client_address(Request("192.168.1.20", "203.0.113.5")) == "192.168.1.20"  # a LAN client's own header
    assert app.client_address(Request("127.0.0.1", "203.0.113.5")) == "127.0.0.1"
    assert app.client_address(Request("93.184.216.34", "1.2.3.4")) == "93.184.216.34"
    # 1 (a Space): the last entry, the one its proxy appended; what the client wrote lies further left
    monkeypatch.setattr(app.module_of("TRUSTED_PROXIES"), "TRUSTED_PROXIES", 1)
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
