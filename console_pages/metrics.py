"""Metrics: what the server has served, over time. Charts of tokens/s and slots, and p50/p95
of time to first token, queue wait, latency and per-answer tokens/s over the last minutes, all
from the console's own history of the server's /metrics (one sampler per console, every 5 s,
so every session sees the same history); then the handler's and TorchServe's figures with
their units. Refreshed every few seconds."""

import pandas as pd
import streamlit as st

from chatstack.console_display import format_number, handler_metric_rows, torchserve_metric_rows
from chatstack.metric_names import (REQUEST_LATENCY_MS, REQUEST_QUEUE_WAIT_MS, REQUEST_TIME_TO_FIRST_TOKEN_MS,
                                    REQUEST_TOKENS_PER_SECOND, SLOTS_ACTIVE, SLOTS_FREE, TOKENS_GENERATED)
from chatstack.metrics_history import prompt_cache_reuse
from console_pages.shared import console_process, metrics_history

# What each distribution chart shows: the histogram, its title, and its unit.
DISTRIBUTIONS = [(REQUEST_TIME_TO_FIRST_TOKEN_MS, "Time to first token", "ms"),
                 (REQUEST_QUEUE_WAIT_MS, "Queue wait (arrival to a free slot)", "ms"),
                 (REQUEST_LATENCY_MS, "Latency (arrival to last token)", "ms"),
                 (REQUEST_TOKENS_PER_SECOND, "Tokens per second of each answer", "tokens/s")]
CHART_SPAN_S = 30 * 60   # the charts show the last half hour of the console's history


def lines(y_title: str) -> dict:
    """A plain Vega-Lite line chart, not st.line_chart: building Altair charts cost most of
    this page's CPU at every refresh while it sat open."""
    return {"mark": {"type": "line", "point": True}, "encoding": {
        "x": {"field": "time", "type": "temporal", "title": None},
        "y": {"field": "value", "type": "quantitative", "title": y_title},
        "color": {"field": "series", "type": "nominal", "title": None, "legend": {"orient": "bottom"}}}}


def long_series(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Columns of a wide frame as (time, series, value) rows, renamed for the legend."""
    return frame.rename(columns=columns).melt(id_vars="time", value_vars=list(columns.values()),
                                              var_name="series", value_name="value").dropna()


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


# ---- state
process = console_process()
history = metrics_history()


@st.fragment(run_every=st.session_state["refresh_s"])
def live_metrics():
    # ---- read
    if not process.is_running():
        st.info("TorchServe is stopped.")
        return
    snap = history.latest
    if snap is None:
        st.caption("Reading the server's metrics (every 5 s)…")
        return
    totals = snap.totals
    window_min = st.session_state.get("percentile_window_min", 5)
    ttft = history.quantiles(REQUEST_TIME_TO_FIRST_TOKEN_MS, window_min * 60)
    latency = history.quantiles(REQUEST_LATENCY_MS, window_min * 60)

    # ---- draw
    # Short values (the columns are narrow); the unit is in each label.
    c = st.columns(5)
    rate = history.rate(TOKENS_GENERATED)
    c[0].metric("Generated tokens/s (now)", "–" if rate is None else f"{rate:.1f}")
    c[1].metric("Tokens generated", format_number(totals.get(TOKENS_GENERATED, 0)))
    c[2].metric("TTFT p50 / p95 (ms)", f"{ms(ttft[0.5])} / {ms(ttft[0.95])}",
                help=f"Time to first token of the answers that finished in the last {window_min} min; "
                     "'–' when none did")
    c[3].metric("Latency p50 / p95 (ms)", f"{ms(latency[0.5])} / {ms(latency[0.95])}",
                help=f"Arrival to last token, answers of the last {window_min} min")
    if SLOTS_FREE in totals:
        used, total = totals.get(SLOTS_ACTIVE, 0), totals.get(SLOTS_ACTIVE, 0) + totals[SLOTS_FREE]
        c[4].metric("Slots active / free", f"{used:.0f} of {total:.0f}", help="Slots in use of all workers' slots")
    else:
        c[4].metric("Slots active / free", "–", help="The workers report their slots once they served a chat")
    reuse = prompt_cache_reuse(totals)
    st.caption(f"Prompt tokens read from the cache instead of computed: {'–' if reuse is None else f'{reuse:.0%}'}. "
               f"History: {len(history.snapshots)} samples of the server's metrics, every 5 s.")

    frame = pd.DataFrame(history.rows(since_s=CHART_SPAN_S))
    if len(frame) > 1:
        frame["time"] = pd.to_datetime(frame["time"], unit="s")
        left, right = st.columns(2)
        left.caption("Tokens per second (from counter deltas)")
        left.vega_lite_chart(long_series(frame, {"generated tokens/s": "generated", "prompt tokens/s": "prompt"}),
                             lines("tokens/s"), height=200, use_container_width=True)
        right.caption("Slots")
        right.vega_lite_chart(long_series(frame, {SLOTS_ACTIVE: "in use", SLOTS_FREE: "free"}), lines("slots"),
                              height=200, use_container_width=True)
    else:
        st.caption("Charts appear after the next refresh.")

    st.markdown(f"**Distributions** — p50 and p95 of the answers that finished in the {window_min} minutes "
                "before each point")
    columns = st.columns(2)
    for i, (histogram, title, unit) in enumerate(DISTRIBUTIONS):
        points = pd.DataFrame(history.quantile_rows(histogram, window_min * 60, since_s=CHART_SPAN_S))
        box = columns[i % 2]
        box.caption(f"{title} ({unit})")
        if points.empty:
            box.caption("No answer finished in the window yet.")
            continue
        points["time"] = pd.to_datetime(points["time"], unit="s")
        box.vega_lite_chart(points, lines(unit), height=180, use_container_width=True)

    left, right = st.columns(2)
    left.markdown("**Llama handler counters**")
    left.dataframe(pd.DataFrame(handler_metric_rows(snap)), hide_index=True)
    right.markdown("**TorchServe metrics**")
    right.dataframe(pd.DataFrame(torchserve_metric_rows(snap)), hide_index=True)


st.select_slider("Percentiles over the last (minutes)", [1, 5, 15, 30], 5, key="percentile_window_min")
live_metrics()
