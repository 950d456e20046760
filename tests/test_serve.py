"""serve.py as a real process on a free loopback port: good and bad requests, the API key, the
captions infer.py writes for the same images (batched or one at a time), /metrics, and the
graceful stop with a request in flight. Every request goes to 127.0.0.1, with a timeout."""
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

from captioning import synthetic
from conftest import ROOT, in_process

KEY = "test-key-" + uuid.uuid4().hex
MAX_UPLOAD_MB = 0.25  # 262,144 bytes: a noise PNG of 400 x 400 is over it
MAX_PIXELS = 200_000  # a 500 x 500 image is refused
TIMEOUT = 120


class Server:
    def __init__(self, process, url):
        self.process, self.url = process, url

    def request(self, path, data=None, content_type=None, key=KEY, method=None):
        """(status, parsed JSON or text, headers)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                status, body, got = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, body, got = e.code, e.read(), e.headers
        text = body.decode()
        return status, json.loads(text) if got.get("Content-Type", "").startswith("application/json") else text, got

    def upload(self, *files, key=KEY):
        """POST /caption with multipart "image" fields: (name, bytes) each."""
        boundary = uuid.uuid4().hex
        parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                         for name, data in files)
        return self.request("/caption", parts + f"--{boundary}--\r\n".encode(),
                            f"multipart/form-data; boundary={boundary}", key=key)


def start_server(model, *flags, env=None):
    """serve.py on a free port (--port 0), once it says it is ready."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model", model, "--port", "0",
                             "--max-length", "12", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    line = proc.stdout.readline()  # blocks until the ready line, or the end of output if it failed
    found = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
    if not found:
        proc.kill()
        pytest.fail(f"serve.py did not start: {line!r} {proc.stderr.read()}")
    return Server(proc, found.group(1))


def stop(server):
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(TIMEOUT)
    finally:
        if server.process.poll() is None:
            server.process.kill()


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-scenes")
    paths = []
    for i in range(6):
        path = folder / f"scene-{i}.png"
        synthetic.scene(31, i)[0].save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = start_server(tiny_model_dir, "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-image-pixels", str(MAX_PIXELS),
                     "--max-batch-size", "4", "--max-wait-ms", "50", env={"GIT_CAPTION_API_KEY": KEY})
    yield s
    assert stop(s) == 0
    assert "Traceback" not in s.process.stderr.read()


def infer_captions(model, paths, *flags):
    out = in_process("infer", "--model", model, "--max-length", "12", "--json", *flags, *paths)
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["caption"] for line in out.stdout.splitlines()]


def test_captions_equal_infer_py_s_batched_or_one_at_a_time(server, scenes, tiny_model_dir):
    one_by_one = infer_captions(tiny_model_dir, scenes, "--batch-size", "1", "--num-workers", "0")
    # one request of six images: they go to the model in batches of up to 4
    status, body, _ = server.upload(*((os.path.basename(p), open(p, "rb").read()) for p in scenes))
    assert status == 200, body
    assert [r["image"] for r in body["images"]] == [os.path.basename(p) for p in scenes]
    assert [r["caption"] for r in body["images"]] == one_by_one and all(r["error"] is None for r in body["images"])
    # six requests at once, one image each; and JSON with base64
    results = [None] * len(scenes)

    def send(k):
        results[k] = server.upload((f"{k}.png", open(scenes[k], "rb").read()))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(scenes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert [r[1]["images"][0]["caption"] for r in results] == one_by_one
    data = base64.b64encode(open(scenes[0], "rb").read()).decode()
    status, body, _ = server.request("/caption", json.dumps({"data": data}).encode(), "application/json")
    assert status == 200 and body["images"][0]["caption"] == one_by_one[0] and body["seconds"] > 0
    # the batch sizes the model ran, in /metrics: some batch held more than one image
    status, text, headers = server.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    sizes = {float(le): int(n) for le, n in re.findall(r'caption_batch_size_bucket\{le="([0-9.]+)"\} (\d+)', text)}
    total = int(re.search(r"caption_batch_size_count (\d+)", text).group(1))
    assert total >= 1 and sizes[1.0] < total  # not every batch was a single image
    assert re.search(r'caption_requests_total\{status="200"\} (\d+)', text)
    assert re.search(r"caption_queue_depth \d+", text)


def test_each_bad_input_is_a_4xx_naming_it_and_a_bad_image_leaves_the_others(server, scenes):
    good = ("good.png", open(scenes[0], "rb").read())
    noise = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))
    cases = [
        (server.upload(("notes.txt", b"not an image at all")), 422, "notes.txt: not a readable image"),
        (server.upload(("cut.png", good[1][: len(good[1]) // 2])), 422, "cut.png: not a readable image"),
        (server.upload(("huge.png", png(Image.new("RGB", (500, 500))))), 422, "too many pixels"),
        (server.upload(("noise.png", png(noise))), 413, "over --max-upload-mb"),
        (server.request("/caption", json.dumps({"url": "http://127.0.0.1:9/none.png"}).encode(), "application/json"),
         422, "http://127.0.0.1:9/none.png: download failed"),
        (server.request("/caption", json.dumps({"url": "ftp://x/y.png"}).encode(), "application/json"), 422,
         "not an http(s) URL"),
        (server.request("/caption", json.dumps({"data": "@@@"}).encode(), "application/json"), 422, "not valid base64"),
        (server.request("/caption", json.dumps({"picture": "x"}).encode(), "application/json"), 422,
         "no image in the request"),
        (server.request("/caption", b"{not json", "application/json"), 400, "not JSON"),
        (server.request("/caption", b"hello", "text/plain"), 415, "Content-Type 'text/plain' is not accepted"),
    ]
    for (status, body, _), expected, needle in cases:
        assert status == expected and needle in body["error"], (status, body)
    # one bad image among good ones: the others are captioned, the bad one carries its reason
    status, body, _ = server.upload(good, ("notes.txt", b"nothing"), good)
    assert status == 200
    assert [r["error"] is None for r in body["images"]] == [True, False, True]
    assert body["images"][0]["caption"] and body["images"][1]["caption"] is None


def test_a_url_that_never_answers_holds_up_no_upload(server, scenes):
    """Downloads have threads of their own: while one hangs on a silent host, uploads are captioned."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/slow.png"
    answer = {}
    waiting = threading.Thread(target=lambda: answer.update(
        url=server.request("/caption", json.dumps({"url": url}).encode(), "application/json")))
    waiting.start()
    conn, _ = silent.accept()  # the server's download is connected and waits for an answer that does not come
    try:
        status, body, _ = server.upload(("good.png", open(scenes[0], "rb").read()))
        assert status == 200 and body["images"][0]["caption"] and "url" not in answer
    finally:
        conn.close()  # the download ends: refused as a failed download
        silent.close()
    waiting.join(TIMEOUT)
    status, body, _ = answer["url"]
    assert status == 422 and f"{url}: download failed" in body["error"]


def test_without_the_key_only_health_answers(server):
    for path, method in (("/caption", "POST"), ("/metrics", "GET"), ("/docs", "GET"), ("/openapi.json", "GET")):
        for key in (None, "wrong-key"):
            status, body, headers = server.request(path, b"" if method == "POST" else None, key=key, method=method)
            assert status == 401 and "API key" in body["error"] and headers["WWW-Authenticate"] == "Bearer", path
    assert server.request("/health", key=None)[:2] == (200, {"status": "ready"})
    # the page challenges with Basic, so that a browser asks; the key as the password lets it in
    status, _, headers = server.request("/", key=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()}
    with urllib.request.urlopen(urllib.request.Request(server.url + "/", headers=basic), timeout=TIMEOUT) as r:
        page = r.read().decode()
    assert 'id="file"' in page and "Copy as alt text" in page and "http" not in page.split("<script>")[1]
    wrong = {"Authorization": "Basic " + base64.b64encode(b"anyone:wrong").decode()}
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(urllib.request.Request(server.url + "/", headers=wrong), timeout=TIMEOUT)
    status, docs, _ = server.request("/openapi.json")
    assert status == 200 and "/caption" in docs["paths"]


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tiny_model_dir, scenes):
    s = start_server(tiny_model_dir, "--max-batch-size", "1")
    images = [(f"{k}.png", open(scenes[k % len(scenes)], "rb").read()) for k in range(24)]
    answer = {}
    sender = threading.Thread(target=lambda: answer.update(result=s.upload(*images, key=None)))
    sender.start()
    # the request is in flight once the model has images queued from it
    for _ in range(10_000):
        status, text, _ = s.request("/metrics", key=None)
        if re.search(r"caption_queue_depth [1-9]", text):
            break
    else:
        pytest.fail("the request never reached the queue")
    s.process.send_signal(signal.SIGTERM)
    sender.join(TIMEOUT)
    status, body, _ = answer["result"]
    assert status == 200 and all(r["caption"] for r in body["images"]) and len(body["images"]) == 24
    assert s.process.wait(TIMEOUT) == 0
    assert "stopped: requests in flight were answered" in s.process.stderr.read()


def test_bad_flags_and_a_busy_port_are_one_line(tiny_model_dir):
    out = in_process("serve", "--model", tiny_model_dir, "--max-batch-size", "0")
    assert out.returncode == 2 and "--max-batch-size" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = in_process("serve", "--model", tiny_model_dir, "--port", str(port))
    assert out.returncode == 2 and f"--port {port}: cannot listen there" in out.stderr
    out = in_process("serve", "--model", "/no/such/model", "--port", "0")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# The page, in a real headless browser (Debian's chromium and chromium-driver; make test installs them)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


class Browser:
    """Just enough of the W3C WebDriver protocol, spoken to chromedriver over loopback."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=800,900"]}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method=method)
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return json.loads(r.read())["value"]

    def do(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def element(self, css):
        return self.do("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css, text):
        self.do("POST", f"/element/{self.element(css)}/value", {"text": text})

    def text(self, css):
        return self.do("GET", f"/element/{self.element(css)}/text")

    def close(self):
        self.do("DELETE", "")


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(10_000):  # until chromedriver answers on its port
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                    if json.loads(r.read())["value"]["ready"]:
                        break
            except OSError:
                if driver.poll() is not None:
                    pytest.fail("chromedriver exited")
        b = Browser(port)
        yield b
        b.close()
    finally:
        driver.kill()
        driver.wait()


def test_the_page_captions_a_chosen_image_in_a_real_browser(server, scenes, tiny_model_dir, browser, tmp_path):
    expected = infer_captions(tiny_model_dir, scenes[:1])[0]
    # This server wants the key: given as the Basic password in the address, as a user would type it at the
    # browser's prompt; the browser then sends it with the page's own request to /caption.
    browser.do("POST", "/url", {"url": server.url.replace("http://", f"http://user:{KEY}@") + "/"})
    browser.type("#file", scenes[0])
    for _ in range(2_000):  # until the caption (or an error) is on the page
        shown, problem = browser.text("#caption"), browser.text("#error")
        if problem or (shown and "Writing" not in shown):
            break
    assert problem == "" and shown == expected
    assert browser.do("POST", "/execute/sync", {"script": "return document.getElementById('preview').alt",
                                                 "args": []}) == expected
    assert browser.do("POST", "/execute/sync", {"script": "return document.getElementById('copy').disabled",
                                                 "args": []}) is False
    shot = tmp_path / "page.png"
    shot.write_bytes(base64.b64decode(browser.do("GET", "/screenshot")))
    assert Image.open(shot).size[0] > 0
    if os.environ.get("SERVE_SCREENSHOT"):  # the README's picture: SERVE_SCREENSHOT=path pytest -k real_browser
        shot.replace(os.environ["SERVE_SCREENSHOT"])


# ---------------------------------------------------------------------------------------------
# A full queue and a late request: the app over a stand-in model that is held inside generate

class HeldModel:
    """server.Captioner's two methods; run_batch waits until released."""

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def pixels(self, name, source):
        return name

    def run_batch(self, names):
        self.inside.set()
        self.release.wait(TIMEOUT)
        return [f"caption of {n}" for n in names]


@contextlib.contextmanager
def app_in_thread(model, settings):
    """server.create_app over `model`, served by uvicorn in a thread on a free loopback port: a Server."""
    import uvicorn

    from captioning import server as server_module

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    app_server = uvicorn.Server(uvicorn.Config(server_module.create_app(model, settings), log_level="warning"))
    thread = threading.Thread(target=app_server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        for _ in range(10_000):  # uvicorn's own flag: the lifespan ran and it serves
            if app_server.started or not thread.is_alive():
                break
            thread.join(0.01)
        assert app_server.started, "the app did not start"
        yield Server(None, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        model.release.set()
        app_server.should_exit = True
        thread.join(TIMEOUT)


def test_a_full_queue_answers_503_with_retry_after_and_a_late_request_504():
    import serve

    settings = serve.parse_args(["--max-batch-size", "1", "--max-queue", "1", "--request-timeout", "30",
                                 "--max-wait-ms", "0"])
    model = HeldModel()
    with app_in_thread(model, settings) as s:
        answers = {}
        first = threading.Thread(target=lambda: answers.update(first=s.upload(("a.png", b"a"), key=None)))
        first.start()
        assert model.inside.wait(TIMEOUT)  # "a" is being captioned: the model is busy
        second = threading.Thread(target=lambda: answers.update(second=s.upload(("b.png", b"b"), key=None)))
        second.start()
        for _ in range(10_000):  # until "b" waits in the queue, which then is full
            if re.search(r"caption_queue_depth 1\b", s.request("/metrics", key=None)[1]):
                break
        status, body, headers = s.upload(("c.png", b"c"), key=None)
        assert status == 503 and headers["Retry-After"] == "1" and "1 images are queued already" in body["error"]
        model.release.set()
        first.join(TIMEOUT)
        second.join(TIMEOUT)
        assert answers["first"][1]["images"][0]["caption"] == "caption of a.png"
        assert answers["second"][1]["images"][0]["caption"] == "caption of b.png"
    settings.request_timeout = 1e-9  # a request that cannot be answered in time: 504
    with app_in_thread(HeldModel(), settings) as s:
        status, body, _ = s.upload(("d.png", b"d"), key=None)
        assert status == 504 and "not captioned within --request-timeout" in body["error"]
