"""The model card every export writes as ``README.md``, in the Hugging Face format: a YAML header (base model,
library, tags, the task's dev metrics as model-index results), then how the model was made and how to run it.
The export folder can be uploaded to the hub as it is."""

from __future__ import annotations

from typing import Any

import yaml

from squat_cli.quant.methods import get_method

HUB_IDS = {"packaged-minilm": "sentence-transformers/all-MiniLM-L6-v2"}
"""squat's names for models that have a hub id."""


def model_card(fmt: str, facts: dict[str, Any], recipe, task, size: dict[str, Any]) -> str:
    """``README.md`` of an export: ``facts`` is the manifest's ``source_run`` (with ``dev_metrics``)."""
    method = str(facts.get("method", "?"))
    wbits, abits = facts.get("wbits"), facts.get("abits")
    base = str(facts.get("model") or recipe.model.name_or_path)
    metrics = facts.get("dev_metrics") or {}
    results = [{"type": k, "name": f"dev {k}", "value": round(float(metrics[k]), 6)}
               for k in task.metric_names() if isinstance(metrics.get(k), (int, float))]
    glue = task.spec is None
    header = {
        "base_model": HUB_IDS.get(base, base),
        "library_name": "squat",
        "pipeline_tag": "text-classification",
        "tags": ["text-classification", "quantization", f"{method}", f"w{wbits}a{abits}", f"squat-{fmt}"],
        "model-index": [{
            "name": f"{task.name}-{method}-w{wbits}a{abits}",
            "results": [{
                "task": {"type": "text-classification", "name": "Text Classification"},
                "dataset": ({"name": f"GLUE {task.display}", "type": "nyu-mll/glue", "config": task.hub_config,
                             "split": "validation"} if glue else {"name": task.name, "type": task.name,
                                                                  "split": "dev"}),
                "metrics": results,
            }],
        }],
    }
    if glue:
        header["datasets"] = ["nyu-mll/glue"]
    t, q = recipe.train, recipe.quant
    made = [f"- start: the full-precision model fine-tuned from `{base}` on {task.display} "
            f"(run `{facts.get('path', '?')}`)",
            f"- quantization: `{method}`, {wbits}-bit weights, "
            + (f"{abits}-bit activations" if abits and int(abits) < 32 else "full-precision activations"),
            f"- training: {t.epochs:g} epochs, {t.optimizer}, lr {t.lr:g}, batch {t.batch_size}, {t.precision}"
            + (f", SAM rho {recipe.sam.rho:g}" if q is not None and get_method(q.method).uses_sam else "")
            + (", distilled from the FP model" if getattr(recipe, "distill", None) is not None else ""),
            f"- seed {facts.get('seed', '?')}; sequence length {recipe.data.max_seq_length}"]
    shown = ", ".join(f"{k} {100 * float(metrics[k]):.2f}" for k in task.metric_names() if k in metrics)
    file_mib = size.get("file_bytes", 0) / 2**20
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {task.display}: {method} W{wbits}A{abits} ({fmt} export)", "",
        f"A low-bit {task.display} classifier made with [squat](https://pypi.org/project/squat/) "
        f"(sharpness- and quantization-aware training). Dev set: {shown or 'not recorded'}.", "",
        "## How it was made", "", *made, "",
        "## Size", "",
        f"- this export: {file_mib:.1f} MiB" + (f" ({size['file_ratio'] * 100:.1f}% of the FP32 checkpoint)"
                                                if isinstance(size.get("file_ratio"), (int, float)) else ""),
        "",
        "## Run it", "",
        "```bash",
        "pip install squat" + (" onnx onnxruntime" if fmt == "onnx" else ""),
        "squat predict . --input texts.csv --output predictions.jsonl   # the task's text columns: "
        + ", ".join([task.hub_text_a, *([task.hub_text_b] if task.hub_text_b else [])]),
        "squat evaluate .                                                  # its dev metrics, as the run scored them",
        "```", "",
    ]
    if fmt == "onnx":
        lines += ["With onnxruntime alone:", "", "```python", "import onnxruntime as ort",
                  "from transformers import AutoTokenizer", "tok = AutoTokenizer.from_pretrained('.')",
                  "session = ort.InferenceSession('model.onnx')",
                  "feed = {i.name: v for i, v in ((i, tok(['A text.'], return_tensors='np')[i.name]) "
                  "for i in session.get_inputs())}",
                  "print(session.run(['logits'], feed)[0])", "```", ""]
    else:
        lines += ["In Python:", "", "```python", "from squat_cli.export import load_packed",
                  "model, tokenizer, manifest = load_packed('.')",
                  "print(model(**tokenizer('A text.', return_tensors='pt')).logits)", "```", ""]
    lines += ["Every file of this folder is listed with its SHA-256 in `manifest.json`; squat refuses the folder if "
              "any of them changes.", ""]
    return "\n".join(lines)
