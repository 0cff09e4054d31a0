"""DVC stage ``load_base``: resolve the base model, quantize it to 4-bit (nf4, double quant), save it with a quantization report."""

from __future__ import annotations

from dataclasses import asdict

from bilora.sources import BaseModelError, resolve
from bilora.io import atomic_write_json
from pipeline.stage import layout
from pipeline.terminal.console import info
from pipeline.terminal.user_error import UserError, cli
from pipeline.stage.runner import Stage


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("load_base", __doc__, argv)
    p = stage.params
    stage.header(p.base.source)
    try:
        resolved = resolve(p.base.source, p.base.revision)
    except BaseModelError as e:
        raise UserError(str(e)) from None
    # the model stack, imported once the source resolves (a bad base.source fails in ~1 s)
    from safetensors import SafetensorError

    from bilora.base import QuantSpec, is_causal_lm, quantize, save_quantized
    from bilora.causal import QUALITY_PROMPT, quality_check

    q = QuantSpec(**{**p.base.quant.model_dump(), "skip_modules": tuple(p.base.quant.skip_modules)})
    tracker = stage.track({"base": p.base.model_dump()}, tags={"base.source": p.base.source})
    with tracker, stage.output(layout.BASE) as tmp:
        try:
            model, report = quantize(resolved, q, p.base.revision)
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(
                f"base.source {p.base.source!r} ({resolved.path}): cannot load the model: {str(e).splitlines()[0]}\n"
                "  fix: point base.source in params.yaml at a complete Hugging Face model folder of a supported architecture "
                "(config.json + *.safetensors; re-copy the folder if a file is truncated)"
            ) from None
        info(
            f"memory {report['memory_bytes_original'] / 2**20:.1f} MiB -> {report['memory_bytes_quantized'] / 2**20:.1f} MiB; "
            f"{report.get('n_quantized_layers', 0)} 4-bit layers, mean relative dequantization error {report.get('mean_rel_dequant_error', 0):.4f}"
        )
        report["provenance"] = resolved.provenance
        if is_causal_lm(model.config):
            from transformers import AutoTokenizer

            report["quality"] = quality_check(model, AutoTokenizer.from_pretrained(resolved.path))
            info(
                f"quality check: perplexity {report['quality']['perplexity']:.2f} on the fixed text; "
                f"{QUALITY_PROMPT.splitlines()[0]!r} -> {report['quality']['greedy_answer'].strip()!r}"
            )
            tracker.log_metrics({"quality.perplexity": report["quality"]["perplexity"]})
            tracker.set_tags({"quality.greedy_answer": report["quality"]["greedy_answer"].strip()[:250]})
        base_info = {
            "provenance": resolved.provenance,
            "quant": asdict(q),
            "stored_dtype": report["stored_dtype"],
            "architectures": model.config.architectures,
        }
        save_quantized(model, resolved.path, tmp / "model", base_info)
        atomic_write_json(tmp / "quant_report.json", report)
        tracker.set_tags(
            {f"base.{k}": v for k, v in resolved.provenance.items()} | {f"kernel.{k}": v for k, v in report.get("kernel", {}).items()}
        )
        tracker.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_dict(report, "quant_report.json")


if __name__ == "__main__":
    main()
