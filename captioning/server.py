"""serve.py's web application (FastAPI on uvicorn): captions over HTTP, batched across requests.

    POST /caption   one or several images: multipart field "image" (repeatable), or JSON
                    {"data": base64} / {"url": "https://..."} / {"images": [{...}, ...]}
                    -> {"images": [{"image", "caption", "error"}], "seconds"}
    GET  /          a page: choose or drop an image, see its caption, copy it as alt text
    GET  /health    {"status": "ready"} (200) or "stopping" (503); never needs the key
    GET  /metrics   Prometheus text: requests by status, latency and batch-size histograms, queue depth
    GET  /docs      OpenAPI documentation

Each image is read and preprocessed in a thread pool (decoding releases the GIL), off the event
loop and off the model's thread, then queued for the batcher (batcher.py), which runs one generate
for up to --max-batch-size queued images: the model never waits for a JPEG while images are queued.
Errors are JSON {"error": "..."} naming what is wrong, with a 4xx status for what the client sent;
one line per failure goes to the server's stderr; no traceback reaches a client.
"""
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from captioning import captioner, decode, prometheus
from captioning.batcher import Batcher, QueueFull, Stopped
from captioning.errors import DataError


PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
MAX_IMAGES_PER_REQUEST = 64
DOWNLOAD_THREADS = 16
PUBLIC_PATHS = ("/health",)
PAGE_PATHS = ("/",)  # a browser cannot send a bearer token on navigation: the page asks with HTTP Basic
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RETRY_AFTER_S = "1"


class ClientError(Exception):
    """What the client sent is wrong: an HTTP status and a message naming the thing."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Captioner:
    """The model and how an image becomes pixels and pixels a caption, as infer.py does it."""

    def __init__(self, model, processor, device, amp_dtype, settings):
        self.model, self.processor, self.device, self.amp_dtype = model, processor, device, amp_dtype
        self.options = captioner.generation_options(max_length=settings.max_length, num_beams=settings.num_beams)
        self.draft = None if settings.exact_preprocessing else decode.draft_size(processor.image_processor)
        self.settings = settings

    def download(self, url):
        """The bytes at an image URL, with infer.py's timeout and size cap; DataError names the URL."""
        return captioner.fetch(url, self.settings.timeout, int(self.settings.max_download_mb * (1 << 20)))

    def pixels(self, name, data):
        """(1, 3, H, W) pixels of an image file's bytes; DataError names the image."""
        try:
            image = decode.open_image(data, draft=self.draft, max_pixels=self.settings.max_image_pixels)
        except DataError as e:
            raise DataError(f"{name}: {str(e).removeprefix('image: ')}") from None
        return captioner.preprocess(self.processor.image_processor, [image])

    def run_batch(self, pixels):
        texts = captioner.generate_pixels(self.model, self.processor, self.device, self.amp_dtype,
                                          torch.cat(pixels), self.options)
        return [captions[0] for captions in texts]


class Metrics:
    def __init__(self, batcher):
        self.requests = prometheus.Counter("caption_requests_total", "POST /caption requests by HTTP status", "status")
        self.images = prometheus.Counter("caption_images_total", "images captioned or refused, by outcome", "outcome")
        self.latency = prometheus.Histogram("caption_request_seconds", "POST /caption latency", LATENCY_BUCKETS)
        self.batch = prometheus.Histogram("caption_batch_size", "images per generate call", (1, 2, 4, 8, 16, 32, 64))
        self.generate = prometheus.Histogram("caption_batch_seconds", "seconds per generate call", LATENCY_BUCKETS)
        self.depth = prometheus.Gauge("caption_queue_depth", "images waiting for the model", batcher.depth)

    def on_batch(self, size, seconds):
        self.batch.observe(size)
        self.generate.observe(seconds)

    def text(self):
        return prometheus.exposition([self.requests, self.images, self.latency, self.batch, self.generate, self.depth])


def log(message):
    print(message, file=sys.stderr, flush=True)


def error(status, message, **headers):
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


CAPTION_DOCS = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "data": {"type": "string", "description": "the image file, base64"},
        "url": {"type": "string", "description": "an http(s) URL the server downloads"},
        "images": {"type": "array", "items": {"type": "object"}, "description": "several {data} or {url}"}}}}}}}


class Service:
    """What the routes share: the captioner, the batcher in front of it, the reading pool, the metrics."""

    def __init__(self, captioner_, settings):
        self.captioner, self.settings = captioner_, settings
        self.batcher = Batcher(captioner_.run_batch, settings.max_batch_size, settings.max_wait_ms / 1000,
                               settings.max_queue)
        self.metrics = Metrics(self.batcher)
        self.batcher.on_batch = self.metrics.on_batch
        self.pool = ThreadPoolExecutor(settings.preprocessing_threads, thread_name_prefix="read")
        # Downloads wait on the network, not the CPU: apart, so that a slow URL holds no upload's decoding.
        self.downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="download")
        self.status = "starting"

    async def caption(self, request):
        """POST /caption: one caption per image sent, in order, each with its error if it failed."""
        t0 = time.perf_counter()
        deadline = t0 + self.settings.request_timeout
        try:
            sources = await read_sources(request, self.settings)
            results = await asyncio.gather(*(self.caption_one(name, source, deadline) for name, source in sources))
        except ClientError as e:
            log(f"{e.status} POST /caption: {e}")
            return error(e.status, str(e), **({"Retry-After": RETRY_AFTER_S} if e.status == 503 else {}))
        body = {"images": [{"image": name, "caption": text, "error": problem} for name, text, problem, _ in results],
                "seconds": round(time.perf_counter() - t0, 4)}
        failed = [(status, problem) for _, _, problem, status in results if problem]
        for status, problem in failed:
            log(f"{status} POST /caption: {problem}")
        if len(failed) == len(results):  # nothing captioned: the request as a whole failed, with the first reason
            return JSONResponse({"error": failed[0][1], **body}, status_code=failed[0][0])
        return body

    async def caption_one(self, name, source, deadline):
        """(name, caption, error, status) of one image; a full queue or a deadline passed ends the whole
        request (ClientError), any other failure only this image."""
        loop = asyncio.get_running_loop()
        try:
            if isinstance(source, str):  # a URL
                source = await asyncio.wait_for(loop.run_in_executor(self.downloads, self.captioner.download, source),
                                                max(deadline - time.perf_counter(), 0))
            pixels = await asyncio.wait_for(loop.run_in_executor(self.pool, self.captioner.pixels, name, source),
                                            max(deadline - time.perf_counter(), 0))
            future = self.batcher.submit(pixels)
            text = await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.perf_counter(), 0))
        except DataError as e:
            self.metrics.images.inc("refused")
            return name, None, str(e), 422
        except QueueFull as e:
            raise ClientError(503, f"server busy: {e}; retry later") from None
        except Stopped as e:
            raise ClientError(503, str(e)) from None
        except TimeoutError:
            raise ClientError(504, f"not captioned within --request-timeout {self.settings.request_timeout:g} s") from None
        self.metrics.images.inc("captioned")
        return name, text, None, 200


def create_app(captioner_, settings, on_ready=None):
    """The FastAPI app over a Captioner; the batcher starts and stops with the app (its lifespan)."""
    service = Service(captioner_, settings)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        service.status = "ready"
        if on_ready:
            on_ready()
        yield
        service.status = "stopping"
        await asyncio.get_running_loop().run_in_executor(None, service.batcher.stop)  # the queued still finish
        service.pool.shutdown()
        service.downloads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="GIT captioning", lifespan=lifespan,
                  description="Captions for images from a fine-tuned GIT model, batched across requests.")

    @app.middleware("http")
    async def authorise_and_count(request, call_next):
        if settings.api_key and request.url.path not in PUBLIC_PATHS and not authorised(request, settings.api_key):
            log(f"401 {request.method} {request.url.path}: no valid API key")
            # The page's challenge is Basic, so that a browser asks for the key (as the password) and then
            # sends it with the page's own requests; a program gets the Bearer one.
            challenge = 'Basic realm="serve.py: the API key as password"' if request.url.path in PAGE_PATHS else "Bearer"
            return error(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                         **{"WWW-Authenticate": challenge})
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:  # never a traceback to the client; one line here
            log(f"500 {request.method} {request.url.path}: {type(e).__name__}: {e}")
            response = error(500, "internal error")
        if request.url.path == "/caption" and request.method == "POST":
            service.metrics.requests.inc(str(response.status_code))
            service.metrics.latency.observe(time.perf_counter() - t0)
        return response

    @app.post("/caption", openapi_extra=CAPTION_DOCS)
    async def caption(request: Request):
        """Captions for the images sent: one per image, in order, each with its error if it failed."""
        return await service.caption(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return JSONResponse({"status": service.status}, status_code=200 if service.status == "ready" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(service.metrics.text(), media_type="text/plain; version=0.0.4")

    return app


def authorised(request, key):
    """Authorization: Bearer KEY, or Basic with KEY as the password (any user name), compared in constant time."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            token = base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


async def read_body(request, limit):
    """The request body, refused (413) past limit bytes before more is read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"request body of {int(declared):,} bytes is over --max-upload-mb ({limit:,} bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ClientError(413, f"request body over --max-upload-mb ({limit:,} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer; one line all the same
        raise ClientError(400, "the client disconnected before its request body was read") from None
    return b"".join(chunks)


async def read_sources(request, settings):
    """[(name, bytes or URL)] of the images a request sends; ClientError names what is wrong."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise ClientError(415, f"Content-Type {kind or 'none'!r} is not accepted: send multipart/form-data with "
                               f"an \"image\" file field, or application/json")
    body = await read_body(request, int(settings.max_upload_mb * (1 << 20)))
    sources = await (multipart_sources(request, body) if kind == "multipart/form-data" else json_sources(body))
    if not sources:
        raise ClientError(422, 'no image in the request: send a multipart "image" file field, or JSON with "data" '
                               '(base64), "url", or "images": [...]')
    if len(sources) > MAX_IMAGES_PER_REQUEST:
        raise ClientError(422, f"{len(sources)} images in one request; at most {MAX_IMAGES_PER_REQUEST}")
    return sources


async def multipart_sources(request, body):
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # the body is read and capped already: parse it from memory
        form = await Request(request.scope, receive=replay).form(max_files=MAX_IMAGES_PER_REQUEST + 1,
                                                                  max_part_size=len(body) + 1)
    except Exception as e:  # python-multipart's and starlette's parse errors
        raise ClientError(400, f"not a readable multipart body ({e})") from None
    try:
        files = [*form.getlist("image"), *form.getlist("images")]
        if any(isinstance(f, str) for f in files):
            raise ClientError(422, 'the multipart "image" field must be a file upload, not text')
        return [(f.filename or f"image {k}", await f.read()) for k, f in enumerate(files)]
    finally:
        await form.close()  # uploads over 1 MB are spooled to temporary files: removed now, not at collection


async def json_sources(body):
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ClientError(400, f"the body is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ClientError(422, 'the JSON body must be an object: {"data": ...}, {"url": ...} or {"images": [...]}')
    items = doc["images"] if "images" in doc else [doc] if ("data" in doc or "url" in doc) else []
    if not isinstance(items, list):
        raise ClientError(422, '"images" must be a list of {"data": base64} or {"url": ...} objects')
    return [json_source(item, k) for k, item in enumerate(items)]


def json_source(item, k):
    where = f"images[{k}]"
    if not isinstance(item, dict) or not (isinstance(item.get("data"), str) or isinstance(item.get("url"), str)):
        raise ClientError(422, f'{where}: needs "data" (the image, base64) or "url" (http or https), as a string')
    name = item.get("name") if isinstance(item.get("name"), str) else None
    if isinstance(item.get("url"), str):
        url = item["url"]
        if not captioner.is_url(url):
            raise ClientError(422, f"{where}.url {url!r}: not an http(s) URL")
        return name or url, url
    try:
        return name or f"image {k}", base64.b64decode(item["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(422, f"{where}.data: not valid base64") from None
