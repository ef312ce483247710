"""llm-compressor's GPTQ (``GPTQModifier``, W4A16) on the calibration optprune uses, for a like-for-like comparison.

llm-compressor pins versions that conflict with optprune's, so it runs in its own virtual environment; the two
halves of this script run in the two environments and meet in files:

    # 1. (optprune's venv) the calibration token ids of a protocol and the dense model as a Hugging Face folder
    python benchmarks/quant/llmc_gptq.py prepare --model smollm2-135m --protocol cpu --data-dir DIR --work W
    # 2. (llm-compressor's own venv; nothing of optprune is imported there)
    python -m venv .venv-llmc && .venv-llmc/bin/pip install llmcompressor
    .venv-llmc/bin/python benchmarks/quant/llmc_gptq.py quantize --work W --group-size 64 [--sparsity 0.5]
    # 3. (optprune's venv) the same evaluator for both outputs
    optprune eval --model W/llmc-w4a16-g64 --protocol cpu --data-dir DIR

``quantize`` runs ``oneshot`` with ``GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])`` (group
size from ``--group-size``; W4A16's preset is 128, SmolLM2's 576-wide layers need 64) on exactly the token ids of
step 1, optionally after ``SparseGPTModifier`` (the sparse + quantized recipe), and saves the compressed folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def prepare(args) -> int:
    import torch
    from optprune.llm_adapters.data import calibration_tokens, get_protocol
    from optprune.llm_adapters.export import save_model
    from optprune.llm_adapters.loading import load_model
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok, meta = load_model(args.model)
    proto = get_protocol(args.protocol)
    ids = calibration_tokens(tok, proto.calibration, nsamples=args.nsamples or proto.nsamples,
                             seqlen=args.seqlen or proto.seqlen, seed=proto.seed, data_dir=args.data_dir)
    torch.save(ids, work / "calibration_ids.pt")
    save_model(model, work / "dense", tok, format="dense", dtype=torch.bfloat16)
    (work / "prepare.json").write_text(json.dumps({"model": args.model, "protocol": args.protocol,
                                                   "calibration": list(ids.shape)}, indent=1))
    print(f"wrote {work}/calibration_ids.pt {tuple(ids.shape)} and {work}/dense")
    return 0


def quantize(args) -> int:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    work = Path(args.work)
    ids = torch.load(work / "calibration_ids.pt")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(str(work / "dense"), dtype="auto")
    tok = AutoTokenizer.from_pretrained(str(work / "dense"))
    recipe = []
    if args.sparsity:
        from llmcompressor.modifiers.obcq import SparseGPTModifier
        recipe.append(SparseGPTModifier(sparsity=args.sparsity, mask_structure=args.mask_structure,
                                        targets=["Linear"], ignore=["lm_head"]))
    recipe.append(GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                           "group_size": args.group_size}}}))
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    elapsed = time.perf_counter() - t0
    name = f"llmc-w4a16-g{args.group_size}" + (f"-s{args.sparsity}" if args.sparsity else "")
    if args.sparsity and args.mask_structure != "0:0":
        name += "-m" + args.mask_structure.replace(":", "of")
    model.save_pretrained(str(work / name), save_compressed=True)
    tok.save_pretrained(str(work / name))
    (work / f"{name}.json").write_text(json.dumps({"oneshot_s": elapsed, "group_size": args.group_size,
                                                   "sparsity": args.sparsity,
                                                   "mask_structure": args.mask_structure}, indent=1))
    print(f"wrote {work / name} ({elapsed:.1f} s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="(optprune's venv) calibration ids and the dense HF folder")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--protocol", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--work", required=True)
    q = sub.add_parser("quantize", help="(llm-compressor's venv) GPTQModifier W4A16 on those ids")
    q.add_argument("--work", required=True)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--sparsity", type=float, default=None, help="SparseGPTModifier first (sparse + quantized)")
    q.add_argument("--mask-structure", default="0:0", help="SparseGPTModifier mask_structure (2:4 or 0:0)")
    args = ap.parse_args(argv)
    return prepare(args) if args.step == "prepare" else quantize(args)


if __name__ == "__main__":
    sys.exit(main())
