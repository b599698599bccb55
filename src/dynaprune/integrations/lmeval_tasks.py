"""Two local lm-eval tasks over our data files, for offline runs and tests (``include_path=`` the folder):

- ``dynaprune_wikitext``: rolling log-likelihood of one text file as one document (word / byte
  perplexity, bits per byte), the text ``dynaprune eval lm`` reads;
- ``dynaprune_sst2``: SST-2 sentences as a two-way multiple choice ("negative" / "positive"), accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dynaprune.errors import DynapruneError

WIKITEXT_YAML = """task: dynaprune_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

SST2_YAML = """task: dynaprune_sst2
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{sentence}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def write_tasks(folder: str | Path, text_file: str | Path, sst2_tsv: str | Path, max_sst2: int | None = None) -> Path:
    """Write both task YAMLs and their JSONL data into ``folder``; returns it (give it as include_path)."""
    folder, text_file, sst2_tsv = Path(folder), Path(text_file), Path(sst2_tsv)
    for path in (text_file, sst2_tsv):
        if not path.is_file():
            raise DynapruneError(f"{path}: no such file")
    folder.mkdir(parents=True, exist_ok=True)
    wiki = folder / "wikitext.jsonl"
    wiki.write_text(json.dumps({"text": text_file.read_text(encoding="utf-8")}) + "\n", encoding="utf-8")
    with sst2_tsv.open(encoding="utf-8", newline="") as f:
        rows = [{"sentence": r["sentence"].strip(), "label": int(r["label"])}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    sst2 = folder / "sst2.jsonl"
    sst2.write_text("".join(json.dumps(r) + "\n" for r in rows[:max_sst2]), encoding="utf-8")
    (folder / "dynaprune_wikitext.yaml").write_text(WIKITEXT_YAML.format(data=wiki.resolve()), encoding="utf-8")
    (folder / "dynaprune_sst2.yaml").write_text(SST2_YAML.format(data=sst2.resolve()), encoding="utf-8")
    return folder
