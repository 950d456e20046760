"""Caption images with a fine-tuned GIT.

    python infer.py img.png photos/ https://example.com/cat.jpg    # path<TAB>caption per image
    python infer.py photos/ --recursive --json                      # one JSON object per image
    python infer.py photos/ --output captions.jsonl                 # or .csv
    python infer.py photos/ --output captions.jsonl --resume        # after a kill: caption the rest
    python infer.py img.png --num-beams 3 --num-captions 3

From Python: `from captioning.captioner import caption; caption(["img.png"], model="git-base-pokemon/best")`.

--model is a save_pretrained folder, a training output folder (its best/ is used) or a Hub id.
Images are read, decoded and preprocessed by --num-workers processes a few batches ahead of the
model; each batch's captions are printed, and appended to --output, as soon as they exist.
An input that cannot be read (missing, not an image, truncated, too many pixels, a failed
download) gets one line on stderr naming it; the others are still captioned; exit status 1.
"""
import json
import os
import sys

from captioning import cli, hub
from captioning.progress import RaiseOnSignal, Stopped


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("inputs", nargs="+", help="image files, folders of images, or http(s) URLs")
    a("--model", default="git-base-pokemon/best",
      help="a save_pretrained folder, a train.py output folder (uses its best/), or a Hub id")
    a("--recursive", action="store_true", help="also caption images in sub-folders of folder inputs")
    a("--json", action="store_true", help='print one JSON object per image: {"image", "caption", "captions", "error"}')
    a("--output", help="also write the results to this .jsonl or .csv file (OUTPUT.partial until all are done)")
    a("--resume", action="store_true",
      help="with --output: keep the rows already in OUTPUT.partial (or a finished OUTPUT) and caption the rest")
    a("--batch-size", type=cli.positive_int, default=32,
      help="images per generate call (on 2 CPU cores, 2,000 photos: 17.0 s at 16, 13.0 s at 32)")
    a("--num-workers", type=cli.non_negative_int, default=max(1, cli.usable_cores() // 2),
      help="processes that read, decode and preprocess images ahead of the model (default: half the usable "
           "cores, at least 1; on a CPU the model keeps the other half); 0: all in this process")
    a("--exact-preprocessing", action="store_true",
      help="decode JPEGs at full size before resizing, so pixels equal the image processor's own output "
           "(slower; by default a large JPEG is decoded at 1/2, 1/4 or 1/8 size)")
    a("--max-image-pixels", type=cli.non_negative_int, default=cli.MAX_IMAGE_PIXELS, help=cli.MAX_IMAGE_PIXELS_HELP)
    a("--max-length", type=cli.positive_int, default=50, help="max_length for model.generate (caption tokens)")
    a("--num-beams", type=cli.positive_int, default=1)
    a("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    a("--temperature", type=cli.positive_float, default=1.0)
    a("--top-p", type=cli.probability, default=1.0)
    a("--num-captions", type=cli.positive_int, default=1,
      help="captions per image (needs --do-sample or --num-beams >= it)")
    a("--device", choices=cli.DEVICES, default="auto")
    a("--precision", choices=cli.PRECISIONS, default="auto",
      help="auto: fp16 on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    a("--attention", choices=cli.ATTENTIONS, default="auto", help=cli.ATTENTION_HELP)
    a("--seed", type=int, default=0, help="for --do-sample")
    a("--trust-remote-code", action="store_true", help="allow a model that ships its own Python code to run it")
    a("--timeout", type=cli.positive_float, default=20.0, help="seconds to wait for a URL")
    a("--max-download-mb", type=cli.positive_float, default=50.0, help="refuse URL downloads larger than this")
    args = p.parse_args(argv)
    if args.num_captions > 1 and not args.do_sample and args.num_beams < args.num_captions:
        p.error("--num-captions above 1 needs --do-sample, or --num-beams at least as large")
    if args.output and not args.output.endswith((".jsonl", ".csv")):
        p.error(f"--output {args.output!r}: the file name must end in .jsonl or .csv")
    if args.output and os.path.isdir(args.output):
        p.error(f"--output {args.output!r} is a folder; name a .jsonl or .csv file")
    if args.resume and not args.output:
        p.error("--resume needs --output: it continues the rows written to OUTPUT.partial")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs


# ---------------------------------------------------------------------------------------------
# The model


# ---------------------------------------------------------------------------------------------
# --output: rows appended to OUTPUT.partial as they come, renamed to OUTPUT when all are done


# ---------------------------------------------------------------------------------------------
# The command line

class Printer:
    """Rows to stdout and errors to stderr, each line flushed as it is written; a progress bar
    with images/s on stderr when stderr is a terminal (lines are printed above it)."""

    def __init__(self, as_json, total, initial=0):
        self.as_json, self.bar = as_json, None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", file=sys.stderr, dynamic_ncols=True)

    def line(self, text, stream):
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def rows(self, rows):
        for row in rows:
            if row["error"] is not None:
                self.line(f"error: {row['image']}: {row['error']}", sys.stderr)
            if self.as_json:
                self.line(json.dumps(row), sys.stdout)
            elif row["error"] is None:
                for text in row["captions"]:
                    self.line(f"{row['image']}\t{text}", sys.stdout)
        if self.bar is not None:
            self.bar.update(len(rows))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None):
    args = parse_args(argv)
    with RaiseOnSignal():  # Ctrl-C or SIGTERM: one line, the rows so far kept, exit 128 + the signal's number
        try:
            return caption_inputs(args)
        except Stopped as e:
            print(f"stopped by {e.name}", file=sys.stderr)
            return 128 + e.signum


def caption_inputs(args):
    # Names are written escaped (shown_name); anything else that a strict encoding cannot take, escaped too.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    hub.offline_unless_needed(args.model)
    # Heavy imports after argument parsing, so --help and flag errors answer at once.
    import torch

    from captioning.captioner import captioned, expand_inputs, load_for_command, loader, reader_for
    from captioning.output_file import Output, ResumeRefused, run_settings

    model, processor, device, amp_dtype = load_for_command(args)

    if device.type == "cpu" and args.num_workers:
        # generate's many small ops wait on every thread at each step: a thread that shares its core
        # with a reading worker stalls all the others. Measured on 2 cores, 2,000 photos: 22.5 s with
        # 2 threads beside the workers, 15.5 s with 1 thread and 1 worker (README: Real-sized data).
        torch.set_num_threads(max(1, cli.usable_cores() - args.num_workers))
    items = expand_inputs(args.inputs, args.recursive)
    if not items:
        print("error: no images found in the inputs given", file=sys.stderr)
        return 1
    output, pending = None, items
    if args.output:
        try:
            output = Output(args.output, items, run_settings(args, args.model, amp_dtype), args.resume)
        except ResumeRefused as e:
            cli.fail(str(e))
        except (OSError, RuntimeError) as e:
            cli.fail(f"--output {args.output!r}: {getattr(e, 'strerror', None) or e}", status=1)
        pending = output.pending
        if output.restarted:
            print(f"note: {output.partial} from an earlier run is started over (--resume continues it)",
                  file=sys.stderr, flush=True)
        if args.resume:
            print(f"resuming: {len(items) - len(pending)} of {len(items)} inputs already in {output.partial}",
                  file=sys.stderr, flush=True)
    bad = sum(row["error"] is not None for row in output.done) if output else 0
    reader = reader_for(pending, processor.image_processor, args.exact_preprocessing, args.timeout,
                        int(args.max_download_mb * (1 << 20)), args.max_image_pixels)
    batches = captioned(model, processor, device, amp_dtype,
                        loader(reader, processor.image_processor, args.batch_size, args.num_workers),
                        max_length=args.max_length, num_beams=args.num_beams, do_sample=args.do_sample,
                        temperature=args.temperature, top_p=args.top_p, num_captions=args.num_captions,
                        seed=args.seed)
    printer = Printer(args.json, len(items), len(items) - len(pending))
    try:
        for rows in batches:
            if output:  # first, so that a row seen on the screen is in the file
                save(output, output.write, rows)
            printer.rows(rows)
            bad += sum(row["error"] is not None for row in rows)
        printer.close()
        if output:
            save(output, output.finish)
    except Stopped as e:
        printer.close()
        print(f"stopped by {e.name}{kept(output)}", file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        printer.close()  # a reading process was killed (out of memory, say)
        cli.fail(f"{str(e).splitlines()[0].rstrip('. ')}{kept(output)}", status=1)
    return 1 if bad else 0


def kept(output):
    return f"; the rows so far are in {output.partial!r}, --resume continues" if output else ""


def save(output, write, *rows):
    """A write to --output, or one line naming the file and exit status 1 (disk full, say); the
    rows written before stay in OUTPUT.partial for --resume."""
    try:
        write(*rows)
    except OSError as e:
        cli.fail(f"--output {output.path!r}: {e.strerror or e}", status=1)


if __name__ == "__main__":
    sys.exit(main())
