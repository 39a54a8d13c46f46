"""Make a servable model folder for dummy-weight benchmarks: the real config.json plus a
synthetic tokenizer.

The H200 has no Hub access, so the real Llama-3 tokenizer is not there. `vllm serve` and
`vllm bench serve` still need one: a WordLevel tokenizer with exactly `vocab_size` entries,
split on whitespace, encodes every decoded id sequence back to the same ids, so the random
dataset's prompts are exactly `--random-input-len` tokens long (vLLM's random dataset
decodes random ids and re-encodes them, vllm/benchmarks/datasets/datasets.py).

Usage: python make_model_dir.py CONFIG_JSON OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers


def make_model_dir(config_json: Path, out_dir: Path) -> Path:
    config = json.loads(config_json.read_text())
    vocab_size = int(config["vocab_size"])
    bos = int(config["bos_token_id"])
    eos_ids = config["eos_token_id"]
    eos = int(eos_ids[0] if isinstance(eos_ids, list) else eos_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_json, out_dir / "config.json")
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": f"t{bos}",
                "eos_token": f"t{eos}",
                "unk_token": "t0",
                "add_bos_token": False,
                "model_max_length": int(config.get("max_position_embeddings", 8192)),
            }
        )
    )
    return out_dir


if __name__ == "__main__":
    print(make_model_dir(Path(sys.argv[1]), Path(sys.argv[2])))
