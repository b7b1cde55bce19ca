"""Tuning: scale the serving version's workers live; change its batch settings without
dropping chats (a version swap); let the console measure which batch size and worker count
serve best (chatstack/batch_tuning.py) and apply its recommendation."""

import pandas as pd
import streamlit as st

from chatstack.batch_tuning import (BATCH_SIZES, CONCURRENCY_LEVELS, Candidate, TunePlan, TuningJob, applied_settings,
                                    candidates, chats_in_flight, latest_run, load_estimate_s,
                                    recommend, tune_and_save, worker_counts_here)
from chatstack.console_display import TUNING_COLUMNS, format_duration, tuning_points, tuning_rows
from chatstack.metric_names import TOKENS_PER_SECOND
from chatstack.model_archive import ModelSettings
from chatstack.model_registry import scale_workers, swap_settings
from chatstack.process_stats import rss_mb
from chatstack.torchserve_client import TorchServeError
from console_pages.shared import console_process, read_models, run_action


@st.cache_resource
def tuning_jobs() -> dict:
    # One per console process, keyed by (run folder, model): a run goes on while the page is
    # left or reloaded, and every browser session sees the same one.
    return {}


def by_load(y_field: str, y_title: str, rule_at: float | None = None) -> dict:
    """A Vega-Lite spec: one line per setting over the number of chats at once."""
    line = {"mark": {"type": "line", "point": True}, "encoding": {
        "x": {"field": "chats at once", "type": "ordinal", "title": "chats at once", "axis": {"labelAngle": 0}},
        "y": {"field": y_field, "type": "quantitative", "title": y_title},
        "color": {"field": "setting", "type": "nominal", "title": None, "legend": {"orient": "bottom"}}}}
    if rule_at is None:
        return line
    rule = {"mark": {"type": "rule", "strokeDash": [4, 4], "color": "firebrick"}, "encoding": {"y": {"datum": rule_at}}}
    return {"layer": [line, rule]}


# ---- state
process = console_process()
client = process.client(timeout=30)
jobs = tuning_jobs()

# ---- read
models, not_listed = read_models(process, client)
defaults = {m.name: m for m in models if m.is_default}

# ---- draw
if not_listed:
    st.error(not_listed)
if not defaults:
    st.info("Register a model first (Models page).")
    st.stop()
name = st.selectbox("Model", list(defaults), key="tune_model")
current = defaults[name]
st.caption(f"Serving version {current.version}: {len(current.workers)} worker(s), "
           f"batch size {current.settings.batch_size}, batch delay {current.settings.max_batch_delay} ms, "
           f"continuous batching {'on' if current.settings.continuous_batching else 'off'}")

st.subheader("Workers (live)")
# Forms: the inputs rerun the page only when submitted, not at every change.
with st.form("scale_form"):
    w1, w2 = st.columns(2)
    min_workers = w1.number_input("Min workers", 0, 16, current.settings.min_workers, key="min_workers")
    max_workers = w2.number_input("Max workers", 0, 16, current.settings.max_workers, key="max_workers")
    scale = st.form_submit_button("Scale workers", key="scale")

st.subheader("Batching (without dropping chats)")
st.caption("TorchServe cannot change these on a running model: the console registers them as a new "
           "version, waits for its workers, makes it the default, lets chats in flight on the old "
           "version finish, then unregisters the old version.")
with st.form("batching_form"):
    b1, b2, b3 = st.columns(3)
    batch = b1.number_input("Batch size", 1, 64, current.settings.batch_size, key="tune_batch")
    delay = b2.number_input("Max batch delay (ms)", 0, 10_000, current.settings.max_batch_delay, key="tune_delay")
    continuous = b3.checkbox("Continuous batching", current.settings.continuous_batching, key="tune_continuous")
    swap = st.form_submit_button("Apply batch settings", key="swap")

# ---- act
if scale:
    run_action(f"Scaling {name} to {min_workers}–{max_workers} workers", lambda step: scale_workers(
        client, name, int(min_workers), int(max_workers), version=current.version))
if swap:
    workers_now = max(1, len(current.workers))
    wanted = ModelSettings(min_workers=workers_now, max_workers=max(workers_now, current.settings.max_workers),
                           batch_size=batch, max_batch_delay=delay, response_timeout=current.settings.response_timeout,
                           continuous_batching=continuous)
    run_action(f"Changing batch settings of {name}", lambda step: "Now serving version "
               + swap_settings(client, process.model_store, name, wanted, on_step=step))

# ---- find the best batch size: state
st.subheader("Find the best batch size")
st.caption("The console loads each setting as a temporary version next to the serving one, sends it short "
           "chats at several numbers of chats at once, measures tokens/s and time to first token (TTFT), "
           "and removes it again. Serving chats go on meanwhile, but share the machine with the measurement.")
job_key = (str(process.run_dir), name)
job = jobs.get(job_key)
source_archive = current.archive
worker_pids = [w["pid"] for m in models if m.name == name for w in m.workers if isinstance(w.get("pid"), int)]
archive_path = process.model_store / source_archive
# A candidate's worker needs about what a serving worker holds now (else the weights and room for the KV cache).
worker_mb = max([rss_mb(pid) or 0 for pid in worker_pids], default=0) \
    or (archive_path.stat().st_size / 2**20 * 1.5 if archive_path.is_file() else 500)


@st.fragment(run_every=2)
def tuning_progress(job: TuningJob):
    # Only while a run goes on: an idle page refreshes nothing here.
    if not job.running:
        st.rerun()   # the whole page, which shows the saved results
    st.progress(job.fraction, text=job.text)
    if job.cancel_flag.is_set():
        st.caption("Cancelling: the current load stops at its next token, then the candidate is removed.")
    elif st.button("Cancel tuning", key="tune_cancel"):
        job.cancel()


if job is not None and job.running:
    tuning_progress(job)
else:
    if job is not None and job.error:
        st.error(f"The last tuning run failed: {job.error}")
    c1, c2, c3 = st.columns(3)
    batch_sizes = c1.multiselect("Batch sizes", sorted(set(BATCH_SIZES) | {current.settings.batch_size}),
                                 [b for b in BATCH_SIZES if b <= 16], key="tune_batch_sizes")
    fitting = worker_counts_here(worker_mb)
    worker_counts = c2.multiselect("Workers", fitting, [1], key="tune_workers",
                                   help="Worker counts this machine holds: a core and the model's memory each")
    levels = c3.multiselect("Chats at once", CONCURRENCY_LEVELS, [1, 4, 8], key="tune_levels")
    c1, c2, c3 = st.columns(3)
    max_tokens = c1.number_input("Tokens per answer", 8, 1024, 64, key="tune_max_tokens")
    level_limit = c2.number_input("Time limit per load (s)", 5, 600, 30, key="tune_level_limit")
    requests_each = c3.number_input("Answers per chat", 1, 10, 1, key="tune_requests_each")
    try:
        samples = client.metric_samples()
    except TorchServeError:
        samples = []
    recent_speed = max((v for n, _, v in samples if n == TOKENS_PER_SECOND), default=None)
    ready = bool(batch_sizes and worker_counts and levels) and archive_path.is_file()
    if not archive_path.is_file():
        st.warning(f"The serving archive {source_archive} is not in the model store, so it cannot be tuned.")
    elif ready:
        plan = TunePlan(model=name, candidates=tuple(candidates(batch_sizes, worker_counts)), concurrency=tuple(levels),
                        max_tokens=int(max_tokens), requests_per_stream=int(requests_each),
                        level_limit_s=float(level_limit),
                        load_estimate_s=load_estimate_s(samples, archive_path.stat().st_size / 2**20))
        expected = plan.estimate_s(recent_speed)
        st.markdown(f"**{len(plan.candidates)} setting(s) × {len(plan.concurrency)} load(s)**: about "
                    f"{format_duration(expected)}, at most {format_duration(plan.limit_s)}.")
    in_flight = chats_in_flight(samples, worker_pids, sum(m.pending_requests for m in models if m.name == name))
    confirmed = True
    if in_flight:
        st.warning(f"{in_flight} chat(s) are in flight on {name} now: tuning slows them down, and they "
                   "make the measurement less exact.")
        confirmed = st.checkbox("Tune anyway while users chat", key="tune_confirm")
    start = st.button("Start tuning", key="tune_start", type="primary", disabled=not (ready and confirmed))
    if start:
        serving = current.settings
        jobs[job_key] = TuningJob(lambda cancel, progress: tune_and_save(
            process.client(timeout=60), process.model_store, process.run_dir, plan, source_archive, serving,
            cancel, progress)).start()
        st.rerun()

# ---- results of the last run (saved in the run folder, so they survive reloads and restarts)
run = latest_run(process.run_dir, name)
if run is not None and not (job is not None and job.running):
    st.markdown(f"**Last run** — started {run.started}, {run.state}"
                + (f": {run.message}" if run.message else ""))
    ttft_limit = st.number_input("TTFT limit (p95, s)", 0.1, 60.0, 2.0, step=0.1, key="tune_ttft_limit",
                                 help="The recommendation is the setting with the most tokens/s whose time to "
                                      "first token stays under this for 95 % of the answers")
    points = pd.DataFrame(tuning_points(run.rows))
    if not points.empty:
        left, right = st.columns(2)
        left.caption("Tokens per second (all chats together)")
        left.vega_lite_chart(points, by_load("tokens/s", "tokens/s"), height=260, use_container_width=True)
        right.caption("Time to first token, p95 (s) — dashed: your limit")
        right.vega_lite_chart(points, by_load("TTFT p95 (s)", "seconds", rule_at=ttft_limit), height=260,
                              use_container_width=True)
    st.dataframe(pd.DataFrame(tuning_rows(run.rows), columns=TUNING_COLUMNS), hide_index=True)
    best = recommend(run.rows, ttft_limit)
    if best is None:
        st.warning(f"No setting kept TTFT p95 within {ttft_limit:g} s without errors: allow a longer TTFT, "
                   "or try fewer chats at once.")
    else:
        choice = best.candidate
        st.info(f"Recommended for TTFT p95 ≤ {ttft_limit:g} s: **{choice.label}** — {best.tokens_per_s:.1f} "
                   f"tokens/s with {best.concurrency} chat(s) at once (TTFT p95 {best.ttft_p95_s:.2f} s).")
        serving_now = Candidate(current.settings.batch_size, max(1, len(current.workers)))
        if choice == serving_now:
            st.caption(f"{name} {current.version} already serves with {choice.label}.")
        elif st.button(f"Apply {choice.label}", key="tune_apply"):
            wanted = applied_settings(choice, current.settings)
            run_action(f"Applying {choice.label} to {name}", lambda step: "Now serving version "
                       + swap_settings(client, process.model_store, name, wanted, on_step=step))
