#!/usr/bin/env python3
"""Decode tokens/s of a Hugging Face model folder through transformers `generate` on this
GPU in bf16, greedy, at the batch sizes given, for comparison with accel's CUDA backend in
the same run (same model, same 64-token prompts, 64 new tokens):

    python3 tests/gpu/hf_decode.py MODEL_DIR OUT.json 1 64

Decode time is generate(65 new tokens) minus generate(1 new token), so prefill is excluded.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

PROMPT = 64
NEW = 64


def timed_generate(model, ids, new_tokens):
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    model_dir, out_path, batches = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    results = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    for batch in batches:
        ids = (torch.arange(PROMPT, device="cuda") % 1000 + 100).repeat(batch, 1)
        timed_generate(model, ids, 4)  # warm-up
        best = float("inf")
        for _ in range(3):
            best = min(best, timed_generate(model, ids, NEW + 1) - timed_generate(model, ids, 1))
        rate = batch * NEW / best
        results[f"batch{batch}_tok_s"] = rate
        print(f"hf_decode: batch {batch}: {rate:.0f} tok/s")
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
