"""train.py's flags, and the lists of flag names that other parts of the program treat alike.

Here rather than in train.py because metrics.py --model scores a model with the same flags (their
defaults, or the values a run saved in its training_args.json), and a resume compares them.
"""
import os

from captioning import cli


SCHEDULES = ("linear", "cosine", "constant")
LOWER_IS_BETTER = ("wer", "cer", "eval_loss")


def parse_args(argv=None, description=None, **defaults):
    """train.py's arguments; its defaults, with argv=[]."""
    p = cli.Parser(description=description)
    declare(p.add_argument)
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.metric_for_best is None:
        args.metric_for_best = "cider_d" if args.objective == "scst" else "wer"
    problem = objective_problem(args)
    if problem:
        p.error(problem)
    if args.hub_model_id is None:
        args.hub_model_id = os.path.basename(os.path.abspath(args.output_dir))
    return args


def objective_problem(args):
    """What is wrong with the flags of --objective scst, or None."""
    if args.objective != "scst":
        return None
    if args.scst_baseline == "mean" and args.scst_samples < 2:
        return ("--scst-samples 1 with --scst-baseline mean: the mean baseline is the reward of an image's "
                "other samples, so it needs at least 2 (or use --scst-baseline greedy)")
    if args.label_smoothing:
        return "--label-smoothing smooths cross-entropy's targets; --objective scst has none (leave it at 0)"
    if args.caption_sampling == "all":
        return "--caption-sampling all: --objective scst trains on the model's own samples, not on the captions"
    return None


COCO_EVAL_HELP = ("also compute the COCO caption evaluation's table, the scores papers report (BLEU-1..4, METEOR, "
                  "ROUGE-L, CIDEr, SPICE), with pycocoevalcap itself; METEOR, SPICE and its tokeniser need Java "
                  "(README: Scoring)")


def declarations():
    """{dest: (option strings, add_argument's keywords)} of train.py's flags, as declare() declares
    them: metrics.py --model takes some of them, with their types, choices and help."""
    found = {}

    def record(*names, **kwargs):
        found[kwargs.get("dest") or names[0][2:].replace("-", "_")] = (names, kwargs)

    declare(record)
    return found


def declare(a):
    """train.py's flags, each declared through a(...), argparse's add_argument or a recorder."""
    a("--dataset", default="reach-vb/pokemon-blip-captions",
      help="Hub dataset id, imagefolder folder, save_to_disk folder, COCO or Karpathy caption file (.json), "
           "or 'synthetic'")
    a("--image-column", default="image")
    a("--text-column", default="text", help="a string, or a list of strings (several references)")
    a("--image-root", default=None,
      help="folder the image paths of a COCO or Karpathy caption file are relative to (default: the file's folder)")
    a("--test-size", type=cli.fraction, default=0.1, help="held-out fraction when the source has no eval split")
    a("--synthetic-size", type=cli.positive_int, default=1000, help="scenes in --dataset synthetic")
    a("--model", default="microsoft/git-base",
      help="Hub id, save_pretrained folder, 'tiny' (a small GIT from scratch, tokenizer learned from the "
           "captions) or 'base-scratch' (git-base's architecture, random: for speed measurements)")
    a("--output-dir", default="git-base-pokemon")
    a("--overwrite-output-dir", action="store_true", help="delete an earlier run's checkpoints in --output-dir")
    a("--epochs", "--num-train-epochs", dest="epochs", type=cli.positive_float, default=50)
    a("--caption-sampling", choices=("one", "all"), default="one",
      help="images with several captions: one drawn per epoch, or all of them, each micro-batch running its "
           "images through the image encoder once for all their captions (see README: Several captions an image)")
    a("--freeze-vision", action="store_true",
      help="train the visual projection and the text decoder only; the image encoder keeps its weights")
    a("--gradient-checkpointing", action="store_true",
      help="recompute each layer's activations in backward instead of keeping them: less memory, more time")
    a("--max-steps", type=cli.positive_int, default=None, help="optimizer steps; overrides --epochs")
    a("--learning-rate", type=cli.positive_float, default=5e-5)
    a("--batch-size", "--per-device-train-batch-size", dest="batch_size", type=cli.positive_int, default=32)
    a("--eval-batch-size", "--per-device-eval-batch-size", dest="eval_batch_size", type=cli.positive_int, default=32)
    a("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=cli.positive_int, default=2)
    a("--eval-steps", type=cli.positive_int, default=50)
    a("--save-steps", type=cli.positive_int, default=50)
    a("--logging-steps", type=cli.positive_int, default=50)
    a("--save-total-limit", type=int, default=3)
    a("--warmup-steps", "--num-warmup-steps", dest="warmup_steps", type=cli.non_negative_int, default=0)
    a("--weight-decay", type=cli.non_negative_float, default=0.0)
    a("--max-grad-norm", type=cli.non_negative_float, default=1.0)
    a("--label-smoothing", type=cli.share, default=0.0,
      help="share of each training target spread over the vocabulary (the GIT authors train with 0.1); "
           "the eval loss is never smoothed")
    declare_objective(a)
    a("--lr-schedule", "--lr-scheduler-type", dest="lr_schedule", choices=SCHEDULES, default="linear")
    a("--precision", choices=cli.PRECISIONS, default="auto",
      help="auto: fp16 + GradScaler on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    a("--device", choices=cli.DEVICES, default="auto")
    a("--seed", type=int, default=42)
    a("--attention", choices=cli.ATTENTIONS, default="auto", help=cli.ATTENTION_HELP)
    a("--compile", action="store_true", help="torch.compile the training forward and backward, for a few fixed batch shapes "
                                            "(see README: Attention and compiling)")
    a("--num-workers", type=cli.non_negative_int, default=0)
    a("--max-bad-steps", type=cli.positive_int, default=10,
      help="fp32/bf16: stop after this many optimizer steps in a row with a non-finite loss (each is skipped)")
    a("--on-bad-sample", choices=("skip", "error"), default="skip",
      help="a row with an unreadable image or empty caption: leave it out (listed in skipped.txt) or stop")
    a("--cache-dir", default=os.environ.get("GIT_CAPTION_CACHE", os.path.join("~", ".cache", "git-caption")),
      help="where images are kept decoded, resized and cropped after the first run (env GIT_CAPTION_CACHE)")
    a("--no-cache", action="store_true", help="preprocess the images in memory each run, keep nothing on disk")
    a("--preprocessing-num-workers", type=cli.positive_int, default=cli.usable_cores(),
      help="processes that decode and resize images into the cache (default: the usable cores)")
    a("--exact-preprocessing", action="store_true",
      help="decode JPEGs at full size before resizing, so pixels equal the image processor's own output "
           "(slower; by default a large JPEG is decoded at 1/2, 1/4 or 1/8 size, see README: Data)")
    a("--max-image-pixels", type=cli.non_negative_int, default=cli.MAX_IMAGE_PIXELS, help=cli.MAX_IMAGE_PIXELS_HELP)
    a("--max-text-length", type=cli.positive_int, default=64, help="captions are truncated to this many tokens")
    a("--gen-max-length", type=cli.positive_int, default=50, help="max_length for model.generate at evaluation")
    a("--eval-num-beams", type=cli.positive_int, default=1,
      help="beams for model.generate at evaluation (1: greedy); metrics.py --model takes the same by default")
    a("--coco-eval", action="store_true", help=COCO_EVAL_HELP)
    a("--metric-for-best", choices=tuple(LOWER_IS_BETTER) + ("bleu4", "rouge_l", "cider_d"), default=None,
      help="the evaluation score that picks best/ (and the checkpoint always kept); default: wer, or cider_d "
           "with --objective scst")
    a("--num-examples", type=cli.non_negative_int, default=3, help="example captions printed and logged per evaluation")
    a("--push-to-hub", action="store_true", help="upload best/ with its model card to the Hub at the end")
    a("--hub-model-id", default=None, help="owner/name of the Hub repo (default: the --output-dir folder name)")
    a("--hub-strategy", choices=("end", "every_save"), default="end",
      help="every_save: also upload best/ after each checkpoint")
    a("--trust-remote-code", action="store_true",
      help="allow a model that ships its own Python code (auto_map in its config) to run it")
    a("--resume", "--resume-from-checkpoint", dest="resume", nargs="?", const="latest", default=None,
      help="continue from the newest checkpoint in --output-dir (or from the folder given)")


def declare_objective(a):
    """The flags of the training objective: cross-entropy, or self-critical training and its settings."""
    a("--objective", choices=("cross-entropy", "scst"), default="cross-entropy",
      help="scst: self-critical sequence training, from a cross-entropy model (--model OUT/best): the model's "
           "own sampled captions, rewarded by CIDEr-D (README: SCST)")
    a("--scst-samples", type=cli.positive_int, default=5, help="--objective scst: captions sampled per image")
    a("--scst-baseline", choices=("mean", "greedy"), default="mean",
      help="--objective scst: what a sample's reward is compared with: the mean reward of the image's other "
           "samples, or the reward of its greedy caption (one more decode)")
    a("--scst-max-length", type=cli.positive_int, default=None,
      help="--objective scst: max_length of the sampled captions (default: --gen-max-length)")


# Flags that decide which samples a step sees, or what a step computes. Resuming with another
# value would quietly make a run that is neither the old one nor a new one, so it is refused;
# every other flag may change (intervals, limits, workers, devices) and is said once.
FIXED_ON_RESUME = ("dataset", "image_root", "image_column", "text_column", "test_size", "synthetic_size",
                   "on_bad_sample", "caption_sampling", "exact_preprocessing", "max_image_pixels", "model", "freeze_vision",
                   "max_text_length", "batch_size", "grad_accum", "seed", "learning_rate", "lr_schedule",
                   "warmup_steps", "weight_decay", "max_grad_norm", "label_smoothing", "metric_for_best",
                   "objective", "scst_samples", "scst_baseline", "scst_max_length")

NOT_COMPARED = ("resume", "overwrite_output_dir", "output_dir", "hub_model_id")


CARD_FLAGS = ("dataset", "model", "objective", "scst_samples", "scst_baseline", "scst_max_length", "epochs",
              "max_steps", "learning_rate", "lr_schedule", "warmup_steps",
              "weight_decay", "batch_size", "grad_accum", "max_grad_norm", "label_smoothing", "precision",
              "max_text_length",
              "caption_sampling", "freeze_vision", "gradient_checkpointing", "gen_max_length", "eval_num_beams", "seed")


# train.py's flags that decide what its evaluation computes. Unless given, they come from the run
# that wrote the model, so that OUT/best scores what the run reported for it.
FROM_THE_RUN = ("dataset", "image_column", "text_column", "image_root", "eval_split", "test_size", "seed",
                "synthetic_size", "precision", "eval_batch_size", "gen_max_length", "eval_num_beams",
                "max_text_length", "exact_preprocessing", "max_image_pixels", "attention")


FLAG_NAMES = {"gen_max_length": "--max-length", "eval_num_beams": "--num-beams"}  # ours, where they differ

def flag_name(name):
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
