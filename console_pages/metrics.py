"""Metrics: the llama handler's counters and gauges and TorchServe's own, with small charts
of tokens/s and slots over time; refreshed every few seconds."""

import pandas as pd
import streamlit as st

from chatstack.console_display import handler_metric_rows, torchserve_metric_rows
from chatstack.metric_names import SLOTS_ACTIVE, SLOTS_FREE, TIME_TO_FIRST_TOKEN_MS, TOKENS_GENERATED
from chatstack.metrics_history import MetricsHistory, prompt_cache_reuse, snapshot
from chatstack.torchserve_client import TorchServeError
from console_pages.shared import console_process

LINES = {"mark": "line", "encoding": {
    "x": {"field": "time", "type": "temporal", "title": None},
    "y": {"field": "value", "type": "quantitative", "title": None},
    "color": {"field": "series", "type": "nominal", "title": None, "legend": {"orient": "bottom"}}}}


def long_series(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.melt(id_vars="time", value_vars=columns, var_name="series", value_name="value")


# ---- state
process = console_process()
history = st.session_state.setdefault("metrics_history", MetricsHistory())


@st.fragment(run_every=st.session_state["refresh_s"])
def live_metrics():
    # ---- read
    if not process.is_running():
        st.info("TorchServe is stopped.")
        return
    try:
        snap = snapshot(process.client(timeout=5))
    except TorchServeError as e:
        st.warning(f"Metrics are not available: {e.message}")
        return
    history.add(snap)
    totals = snap.totals

    # ---- draw
    c = st.columns(5)
    rate = history.rate(TOKENS_GENERATED)
    c[0].metric("Generated tokens/s (now)", "–" if rate is None else f"{rate:.1f}")
    c[1].metric("Tokens generated", f"{totals.get(TOKENS_GENERATED, 0):.0f}")
    ttft = totals.get(TIME_TO_FIRST_TOKEN_MS)
    c[2].metric("Time to first token (last)", "–" if ttft is None else f"{ttft:.0f} ms")
    c[3].metric("Slots active / free", f"{totals.get(SLOTS_ACTIVE, 0):.0f} / {totals.get(SLOTS_FREE, 0):.0f}")
    reuse = prompt_cache_reuse(totals)
    c[4].metric("Prompt-cache reuse", "–" if reuse is None else f"{reuse:.0%}")

    frame = pd.DataFrame(history.rows())
    if len(frame) > 1:
        frame["time"] = pd.to_datetime(frame["time"], unit="s")
        left, right = st.columns(2)
        left.caption("Tokens per second (from counter deltas)")
        # A plain Vega-Lite spec, not st.line_chart: building Altair charts cost most of this
        # page's CPU at every refresh while it sat open.
        left.vega_lite_chart(long_series(frame, ["generated tokens/s", "prompt tokens/s"]), LINES, height=200,
                             use_container_width=True)
        right.caption("Slots")
        right.vega_lite_chart(long_series(frame, [SLOTS_ACTIVE, SLOTS_FREE]), LINES, height=200,
                              use_container_width=True)
    else:
        st.caption("Charts appear after the next refresh.")

    left, right = st.columns(2)
    left.markdown("**Llama handler counters**")
    left.dataframe(pd.DataFrame(handler_metric_rows(snap)), hide_index=True)
    right.markdown("**TorchServe metrics**")
    right.dataframe(pd.DataFrame(torchserve_metric_rows(snap)), hide_index=True)


live_metrics()
