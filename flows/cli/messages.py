"""What the `enrich` command prints on a terminal: a run's summary, a trial's projection, an estimate."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from llm_enrich.flows.cli.wording import as_flags

__all__ = ["print_estimate", "print_summary"]


def print_estimate(out_console: Console, e: dict[str, Any]) -> None:
    """The --dry-run / `enrich estimate` figures."""
    cost = "unknown (no price for this model; pass --input-price/--output-price)"
    if e["estimated_cost_usd"] is not None:
        cost = f"at most ${e['estimated_cost_usd']:.4f}"
        online, batch = e.get("online_cost_usd"), e.get("batch_cost_usd")
        if online is not None and batch is not None and online != batch:
            cost += f" (online prices ${online:.4f}; --mode batch or --service-tier flex ${batch:.4f})"
    out_console.print(
        f"[bold]Estimate[/] (nothing was sent): {e['rows_valid']} of {e['rows_in']} rows valid, "
        f"{e['rows_rejected']} rejected; {e['rows_cached']} already answered, {e['rows_kept_failed']} kept as failed; "
        f"{e['rows_to_ask']} rows to ask as {e['unique_prompts']} distinct prompts; "
        f"about {e['estimated_input_tokens']:,} input tokens and at most {e['max_output_tokens']:,} output tokens; "
        f"cost {cost} with {escape(e['model'])}.",
        highlight=False,
        soft_wrap=True,
    )


def print_summary(out_console: Console, s: dict[str, Any]) -> None:
    """The run's one summary paragraph, its notes, and a trial's projection."""
    if s.get("batches_pending"):  # --batch-no-wait: submitted, nothing written yet
        out_console.print(f"[bold]Batch mode:[/] {escape(as_flags(s['notes'][0]))}.", highlight=False, soft_wrap=True)
        return
    rejected = f", {s['rows_rejected']} rejected (see {escape(s['rejected_output'])})" if s["rows_rejected"] else ""
    cost = f", ${s['cost_usd']:.4f}" if s["cost_usd"] is not None else ""
    out_console.print(
        f"[bold green]Enriched[/] {s['rows_valid']} of {s['rows_in']} rows into [bold]{escape(s['output'])}[/]: "
        f"{s['rows_ok']} ok, {s['rows_failed']} failed{rejected}"
        f"{f', {truncated} cut off at --max-tokens' if (truncated := s.get('rows_truncated')) else ''}.\n"
        f"{s['rows_cached']} from the cache, {s['rows_deduplicated']} deduplicated; {s['requests']} requests "
        f"({s['retries']} retries, {s['rate_limited']} rate-limited, {s.get('timeouts', 0)} timed out), "
        f"tokens {s['input_tokens']:,} in / {s['output_tokens']:,} out{cost}, {s['wall_seconds']:.1f} s, "
        f"model {escape(s['model'])} at {escape(s['endpoint'])}.",
        highlight=False,
        soft_wrap=True,
    )
    for note in s.get("notes") or []:
        out_console.print(f"[bold]Note:[/] {escape(as_flags(note))}", highlight=False, soft_wrap=True)
    if (whole := s.get("full_run_estimate")) is not None:
        _print_full_run(out_console, s, whole)


def _print_full_run(out_console: Console, s: dict[str, Any], whole: dict[str, Any]) -> None:
    """After a trial: where it went, and what the whole table would still cost."""
    cost = whole["projected_cost_usd"]
    ceiling = whole["ceiling_cost_usd"]
    basis = (
        f"at the tokens this trial used per prompt ({whole['based_on_prompts']} prompts)"
        if whole["based_on_prompts"]
        else "from estimated tokens (the trial sent nothing)"
    )
    out_console.print(
        f"[bold]Trial[/] on {escape(s['trial'])}: the output itself was not written. The whole table: "
        f"{whole['rows']:,} valid rows, {whole['distinct_prompts_to_send']:,} distinct prompts still to send, "
        f"about {whole['projected_input_tokens']:,} tokens in / {whole['projected_output_tokens']:,} out"
        + (f", about ${cost:.4f} {basis}" if cost is not None else f" {basis}")
        + (f" (ceiling ${ceiling:.4f} if every answer used --max-tokens)" if ceiling is not None else "")
        + ". Run again without --limit/--sample to enrich the rest; the trial's answers come from the cache.",
        highlight=False,
        soft_wrap=True,
    )
