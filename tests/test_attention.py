"""--attention sdpa computes what GIT's eager attention computes, in training and in generate,
and leaves checkpoints that plain transformers loads."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from captioning import attention, runtime, synthetic
import train
from captioning.attention import SdpaSelfAttention
from conftest import ROOT, in_process
from captioning.gitmodel import load_model


def both(model_dir):
    """The model as transformers loads it, and a copy with the fused attention swapped in."""
    eager, processor = load_model(model_dir, attention="eager")
    eager.eval()
    return eager, attention.set_attention(copy.deepcopy(eager), "sdpa"), processor


def padded_batch(processor, n=4, seed=5):
    """n scenes, captions of different lengths right-padded beside each other (2 captions an image)."""
    scenes = [synthetic.scene(seed, i) for i in range(n)]
    pixels = processor.image_processor([image for image, _ in scenes], return_tensors="pt")["pixel_values"]
    captions = [caption for _, caption in scenes] + [caption.split(" and ")[0] for _, caption in scenes]
    text = processor.tokenizer(captions, padding=True, return_tensors="pt")
    assert (text["attention_mask"] == 0).any(), "the batch must hold padding"
    return pixels, text


def test_sdpa_keeps_the_parameters_and_swaps_every_decoder_attention(no_dropout_model):
    eager, fused, _ = both(no_dropout_model)
    assert list(eager.state_dict()) == list(fused.state_dict())
    assert all(isinstance(layer.attention.self, SdpaSelfAttention) for layer in fused.git.encoder.layer)
    assert fused.git.image_encoder.config._attn_implementation == "sdpa"
    assert eager.git.image_encoder.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.set_attention(eager, "flash")


def test_the_vision_layers_run_through_sdpa(no_dropout_model, monkeypatch):
    """The vision tower's attention is transformers' own: what shows that it took the fused path is
    a call to F.scaled_dot_product_attention from each of its layers."""
    eager, fused, processor = both(no_dropout_model)
    pixels = processor.image_processor([synthetic.scene(4, 0)[0]], return_tensors="pt")["pixel_values"]
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    seen = []
    for model in (eager, fused):
        calls.clear()
        with torch.no_grad():
            model.git.image_encoder(pixels)
        seen.append(len(calls))
    assert seen == [0, len(fused.git.image_encoder.vision_model.encoder.layers)]


def test_outputs_and_gradients_equal_eager_on_a_padded_batch(no_dropout_model):
    eager, fused, processor = both(no_dropout_model)
    pixels, text = padded_batch(processor)
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    outputs = {}
    for name, model in (("eager", eager), ("sdpa", fused)):
        model.train()  # dropout is off in this model; train mode is the path training takes
        vision = model.git.image_encoder(pixels).last_hidden_state
        out = model(pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    labels=labels)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        outputs[name] = vision, out.logits, out.loss, grads
    (v_e, logits_e, loss_e, grads_e), (v_s, logits_s, loss_s, grads_s) = outputs["eager"], outputs["sdpa"]
    torch.testing.assert_close(v_s, v_e, atol=1e-5, rtol=0)
    # Every position, padding included: the fused attention uses the same mask rows.
    torch.testing.assert_close(logits_s, logits_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_s, loss_e, atol=1e-6, rtol=0)
    assert grads_e.keys() == grads_s.keys() and len(grads_e) == len(list(eager.parameters()))
    for k in grads_e:
        torch.testing.assert_close(grads_s[k], grads_e[k], atol=1e-5, rtol=1e-4, msg=k)


def test_without_images_sdpa_equals_eager_and_stays_causal(no_dropout_model):
    """GIT runs on text alone (pixel_values=None): no query is an image token then, and each caption
    token sees only those before it, so a prefix's logits do not change when tokens are appended."""
    eager, fused, processor = both(no_dropout_model)
    _, text = padded_batch(processor)
    with torch.no_grad():
        logits = [m(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits for m in (eager, fused)]
        unpadded = text["input_ids"][:1, :6]
        prefix = fused(input_ids=unpadded[:, :3]).logits
        longer = fused(input_ids=unpadded).logits
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(longer[:, :3], prefix, atol=1e-5, rtol=0)
    with torch.inference_mode():  # generate from a text prompt alone, with the cache
        ids = [m.generate(input_ids=unpadded[:, :2], max_length=10, do_sample=False) for m in (eager, fused)]
    assert torch.equal(ids[1], ids[0])


def test_output_attentions_gives_eager_attention_maps(no_dropout_model):
    eager, fused, processor = both(no_dropout_model)
    pixels, text = padded_batch(processor)
    with torch.no_grad():
        outs = [m(pixel_values=pixels, **text, output_attentions=True) for m in (eager, fused)]
    maps_e, maps_s = outs[0].attentions, outs[1].attentions
    assert len(maps_s) == len(maps_e) == len(fused.git.encoder.layer)
    for a, b in zip(maps_e, maps_s):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=0)


def test_fused_calls_never_use_cudnn_and_the_caption_call_prefers_the_masked_kernel(no_dropout_model, monkeypatch):
    """The kernels torch may pick at each call (attention.py says why): the choice is read from torch
    inside each call, on this CPU, where the same flags decide CUDA's choice."""
    _, fused, processor = both(no_dropout_model)
    pixels, text = padded_batch(processor)
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, value, attn_mask=None, **kwargs):
        seen.append((attn_mask is not None, torch.backends.cuda.cudnn_sdp_enabled(),
                     torch._C._get_sdp_priority_order()[0]))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    with torch.no_grad():
        fused(pixel_values=pixels, **text)
    decoder = seen[-2 * len(fused.git.encoder.layer):]  # after the vision tower's calls: two a decoder layer
    image_calls, caption_calls = decoder[0::2], decoder[1::2]
    assert not any(cudnn for _, cudnn, _ in decoder)
    assert all(not masked and first == attention.IMAGE_KERNELS[0].value for masked, _, first in image_calls)
    assert all(masked and first == attention.CAPTION_KERNELS[0].value for masked, _, first in caption_calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's own setting is back after each call


def test_fp16_autocast_sdpa_is_as_close_to_fp32_as_eager_is(no_dropout_model):
    """fp16 autocast (CUDA's default precision) on this CPU: both attentions round, differently;
    sdpa's error against fp32 eager is at most twice eager's own, in loss, logits and every gradient."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import check_gpu

    result = check_gpu.check_attention_numbers(no_dropout_model, torch.device("cpu"), "fp16", images=3)
    assert result["status"] == "passed", result
    assert result["sdpa_vs_fp32"]["grads_compared"] == len(list(AutoModelForCausalLM.from_pretrained(
        no_dropout_model).parameters()))
    assert 0 < result["eager_vs_fp32"]["logits"]  # fp16 did round: the comparison is not of equal numbers


def test_bf16_autocast_stays_close_to_eager(no_dropout_model):
    eager, fused, processor = both(no_dropout_model)
    pixels, text = padded_batch(processor)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = [m(pixel_values=pixels, **text).logits.float() for m in (eager, fused)]
    assert logits[1].isfinite().all()
    assert (logits[1] - logits[0]).abs().max() < 0.1  # bf16 keeps ~3 significant digits


def test_greedy_and_beam_generate_are_identical_batched_and_one_at_a_time(trained_run):
    eager, fused, processor = both(os.path.join(trained_run, "best"))
    images = [synthetic.scene(77, i)[0] for i in range(6)]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        for options in (dict(max_length=30), dict(max_length=30, num_beams=3)):
            runs = {}
            for name, model in (("eager", eager), ("sdpa", fused)):
                batched = model.generate(pixel_values=pixels, **options)
                single = [model.generate(pixel_values=pixels[i:i + 1], **options)[0] for i in range(len(images))]
                runs[name] = processor.batch_decode(batched, skip_special_tokens=True), \
                    processor.batch_decode(single, skip_special_tokens=True)
            assert runs["sdpa"] == runs["eager"], options
            assert runs["sdpa"][0] == runs["sdpa"][1], options
            assert len(set(runs["sdpa"][0])) >= 3, runs  # a trained model: the captions differ
        # fp16 autocast, CUDA's default precision, here on the CPU: the same greedy captions
        with torch.autocast("cpu", dtype=torch.float16):
            fp16 = [processor.batch_decode(m.generate(pixel_values=pixels, max_length=30), skip_special_tokens=True)
                    for m in (eager, fused)]
        assert fp16[1] == fp16[0] and len(set(fp16[0])) >= 3, fp16


def test_checkpoint_trained_with_sdpa_loads_in_plain_transformers_with_the_same_captions(no_dropout_model, tmp_path):
    out = tmp_path / "run"
    train.main(["--dataset", "synthetic", "--synthetic-size", "64", "--model", no_dropout_model, "--batch-size", "8",
                "--grad-accum", "1", "--max-steps", "6", "--eval-steps", "6", "--save-steps", "6",
                "--logging-steps", "3", "--precision", "fp32", "--attention", "sdpa", "--output-dir", str(out)])
    saved = out / "best"
    config = (saved / "config.json").read_text()
    assert "sdpa" not in config
    # A fresh interpreter, nothing of ours imported: what any transformers user does with the folder.
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoProcessor\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); p = AutoProcessor.from_pretrained(sys.argv[1])\n"
            "x = torch.load(sys.argv[2])\n"
            "print('\\n'.join(p.batch_decode(m.generate(pixel_values=x, max_length=30), skip_special_tokens=True)))")
    _, fused, processor = both(str(saved))
    images = [synthetic.scene(78, i)[0] for i in range(4)]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.save(pixels, tmp_path / "pixels.pt")
    plain = subprocess.run([sys.executable, "-c", code, str(saved), str(tmp_path / "pixels.pt")],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stderr
    with torch.inference_mode():
        ours = processor.batch_decode(fused.generate(pixel_values=pixels, max_length=30), skip_special_tokens=True)
    assert plain.stdout.splitlines() == ours
    trained = AutoModelForCausalLM.from_pretrained(saved)
    start = AutoModelForCausalLM.from_pretrained(no_dropout_model)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_infer_fp32_captions_are_identical_with_both_attentions(trained_run, tmp_path):
    files = []
    for i in range(5):
        image, _ = synthetic.scene(79, i)
        files.append(str(tmp_path / f"{i}.png"))
        image.save(files[-1])
    lines = {}
    for name in attention.ATTENTIONS:
        proc = in_process("infer", "--model", os.path.join(trained_run, "best"), "--precision", "fp32",
                          "--attention", name, "--batch-size", "2", *files)
        assert proc.returncode == 0, proc.stderr
        lines[name] = proc.stdout.splitlines()
    assert len(lines["sdpa"]) == 5 and lines["sdpa"] == lines["eager"]


def test_auto_attention_is_sdpa_on_cuda_and_eager_on_a_cpu():
    assert runtime.pick_attention("auto", torch.device("cuda")) == "sdpa"
    assert runtime.pick_attention("auto", torch.device("cpu")) == "eager"
    assert runtime.pick_attention("sdpa", torch.device("cpu")) == "sdpa"
