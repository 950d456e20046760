"""Serve captions over HTTP, batched across requests, with a page people can use.

    python serve.py --model OUT/best                       # http://127.0.0.1:8000: the page, /docs, /caption
    python serve.py --model OUT/best --port 0              # any free port; the ready line names it
    GIT_CAPTION_API_KEY=secret python serve.py --host 0.0.0.0 --model OUT/best
    curl -F image=@cat.jpg http://127.0.0.1:8000/caption

The model loads once; one line says when the server is ready. Requests wait in one bounded queue
(--max-queue images; beyond it 503 with Retry-After); the model takes up to --max-batch-size images
at once, waiting at most --max-wait-ms for a batch to fill, and runs one generate per batch with the
settings given here (--num-beams, --max-length), preprocessing as infer.py does: the same image gives
the same caption. SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, exit 0.
The API and the measured figures: README, "Serving".
"""
import os
import signal
import socket
import sys

from captioning import cli, hub

API_KEY_ENV = "GIT_CAPTION_API_KEY"


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--model", default="git-base-pokemon/best",
      help="a save_pretrained folder, a train.py output folder (uses its best/), or a Hub id")
    a("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; give --api-key then)")
    a("--port", type=cli.non_negative_int, default=8000, help="0: a free port, named in the ready line")
    a("--api-key", default=os.environ.get(API_KEY_ENV),
      help=f"every endpoint but /health needs 'Authorization: Bearer KEY', or HTTP Basic with KEY as the password "
           f"(a browser asks for it on the page) (env {API_KEY_ENV})")
    a("--max-batch-size", type=cli.positive_int, default=16, help="images per generate call at most")
    a("--max-wait-ms", type=cli.non_negative_float, default=10.0,
      help="how long the oldest queued image waits for others to fill its batch")
    a("--max-queue", type=cli.positive_int, default=256, help="images waiting for the model at most; then 503")
    a("--request-timeout", type=cli.positive_float, default=60.0,
      help="seconds a request may take (reading, queue, generate); then 504")
    a("--max-upload-mb", type=cli.positive_float, default=20.0, help="request bodies larger than this get 413")
    a("--max-image-pixels", type=cli.non_negative_int, default=cli.MAX_IMAGE_PIXELS, help=cli.MAX_IMAGE_PIXELS_HELP)
    a("--timeout", type=cli.positive_float, default=20.0, help="seconds to wait for an image URL")
    a("--max-download-mb", type=cli.positive_float, default=50.0, help="refuse URL downloads larger than this")
    a("--preprocessing-threads", type=cli.positive_int, default=max(1, cli.usable_cores() // 2),
      help="threads that read, decode and preprocess images beside the model (default: half the usable cores)")
    a("--exact-preprocessing", action="store_true",
      help="decode JPEGs at full size before resizing, as infer.py --exact-preprocessing")
    a("--max-length", type=cli.positive_int, default=50, help="max_length for model.generate (caption tokens)")
    a("--num-beams", type=cli.positive_int, default=1)
    a("--device", choices=cli.DEVICES, default="auto")
    a("--precision", choices=cli.PRECISIONS, default="auto",
      help="auto: fp16 on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    a("--attention", choices=cli.ATTENTIONS, default="auto", help=cli.ATTENTION_HELP)
    a("--trust-remote-code", action="store_true", help="allow a model that ships its own Python code to run it")
    args = p.parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():
        p.error(f"--api-key (or {API_KEY_ENV}) is empty")
    return args


def bind(host, port):
    """The listening socket, bound before the model loads, so that a port in use is one line at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        cli.fail(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})")
    return sock


def main(argv=None):
    args = parse_args(argv)
    sock = bind(args.host, args.port)
    hub.offline_unless_needed(args.model)
    import torch
    import uvicorn

    from captioning import server
    from captioning.captioner import load_for_command

    model, processor, device, amp_dtype = load_for_command(args)
    if device.type == "cpu":  # generate's small ops stall on a thread that shares a core with image reading
        torch.set_num_threads(max(1, cli.usable_cores() - args.preprocessing_threads))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def ready():
        print(f"ready: {args.model} on http://{shown}:{port} ({device.type}, "
              f"{'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]}, max batch {args.max_batch_size}, "
              f"max wait {args.max_wait_ms:g} ms{', API key required' if args.api_key else ''}); "
              f"page /, API /docs", flush=True)

    app = server.create_app(server.Captioner(model, processor, device, amp_dtype, args), args, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=args.request_timeout + 5)
    # uvicorn stops gracefully on SIGTERM and SIGINT, then raises the signal again under the handlers it
    # found: with these, that second delivery does nothing and the exit status is 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("stopped: requests in flight were answered", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
