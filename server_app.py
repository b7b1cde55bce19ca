"""Admin console for the chat stack's TorchServe: `streamlit run server_app.py`.

Every view re-reads the server on each run, so the page never shows a state the
server does not have. The work itself lives in chatstack.admin and friends.
"""

from datetime import datetime

import pandas as pd
import streamlit as st

from chatstack import admin
from chatstack.model_archive import DEFAULT_ARCHIVE, ArchiveError, ModelSettings, list_archives
from chatstack.torchserve_client import Keys, TorchServeError
from chatstack.torchserve_process import StartError, TorchServeProcess

FAILURES = (StartError, ArchiveError, TorchServeError, ValueError)

st.set_page_config(page_title="TorchServe admin console", page_icon="🛠️", layout="wide")


@st.cache_resource
def console_process(config: str, store: str, run_dir: str, overrides: tuple) -> TorchServeProcess:
    # One object per server for the console's lifetime: it owns the TorchServe child process.
    return TorchServeProcess(config, store, run_dir, overrides=dict(overrides))


settings = admin.ConsoleConfig.from_env()
process = console_process(str(settings.config), str(settings.model_store), str(settings.run_dir),
                          settings.overrides)


def finish(kind: str, message: str, steps: list[str] | None = None) -> None:
    """Show the outcome after a rerun, which re-reads everything from the server."""
    st.session_state["flash"] = (kind, message, steps or [])
    st.rerun()


def run_action(title: str, action) -> None:
    """Run `action(on_step)` showing its steps; any failure shows TorchServe's own message."""
    steps: list[str] = []
    with st.status(title, expanded=True) as box:
        def on_step(text: str) -> None:
            steps.append(text)
            box.write(text)
        try:
            message = action(on_step)
        except FAILURES as e:
            box.update(label=f"{title}: failed", state="error")
            finish("error", getattr(e, "message", None) or str(e), steps)
        box.update(label=f"{title}: done", state="complete")
    finish("success", message or f"{title}: done", steps)


# ---- sidebar ---------------------------------------------------------------------------

with st.sidebar:
    st.title("TorchServe console")
    refresh_s = st.slider("Auto-refresh every (s)", 1, 30, 5, key="refresh_s")
    log_lines = st.slider("Log lines", 10, 200, 40, step=10, key="log_lines")
    st.caption(f"Model store: `{process.model_store}`")
    st.caption(f"Run folder: `{process.run_dir}`")
    st.caption(f"Config: `{process.base_config}`")

st.title("TorchServe admin console")

# Always one container here, message or not: the tabs below then keep their place in
# the page, and the browser keeps the open tab across reruns.
with st.container():
    if "flash" in st.session_state:
        kind, message, steps = st.session_state.pop("flash")
        (st.error if kind == "error" else st.success)(message)
        if steps:
            with st.expander("Steps", expanded=kind == "error"):
                st.markdown("\n".join(f"- {s}" for s in steps))

status = admin.server_status(process)
client = process.client(timeout=30)

server_tab, models_tab, tuning_tab, status_tab, metrics_tab, security_tab = st.tabs(
    ["Server", "Models", "Tuning", "Status", "Metrics", "Security"])

# ---- server ----------------------------------------------------------------------------

with server_tab:
    col_state, col_health, col_version, col_uptime = st.columns(4)
    col_state.metric("State", "Running" if status.running else "Stopped")
    col_health.metric("Health (/ping)", status.health)
    col_version.metric("TorchServe version", status.version or "–")
    col_uptime.metric("Uptime", admin.format_duration(status.uptime_s))
    st.dataframe(pd.DataFrame([{"API": k, "address": v} for k, v in status.addresses.items()]),
                 hide_index=True)
    if status.running:
        st.caption(f"pid {status.pid} · logs in `{process.log_dir}`")

    register_default = st.checkbox(f"Register the default model ({DEFAULT_ARCHIVE}) after start", value=True,
                                   key="register_default")
    start_col, stop_col, _ = st.columns([1, 1, 4])
    if start_col.button("Start TorchServe", type="primary", key="start"):
        run_action("Starting TorchServe", lambda step: admin.start_server(
            process, register_default=register_default, on_step=step) or "TorchServe is running")
    if stop_col.button("Stop TorchServe", key="stop"):
        run_action("Stopping TorchServe", lambda step: admin.stop_server(process))

    st.subheader("Recent log lines")
    log = process.log_tail(log_lines)
    st.code("\n".join(log) if log else "(no log yet)", language=None)

# ---- models ----------------------------------------------------------------------------

archives = list_archives(process.model_store)
try:
    models = admin.registered_models(client) if status.running and status.version else []
except TorchServeError as e:  # the server went away or refused since the status above
    st.error(f"TorchServe did not list its models: {e.message}")
    models = []

with models_tab:
    st.subheader("Archives in the model store")
    if archives:
        st.dataframe(pd.DataFrame([{
            "archive": a.file, "model": a.model_name, "version": a.version, "MB": round(a.size_bytes / 1e6, 1),
            "batch size": a.settings.batch_size, "batch delay ms": a.settings.max_batch_delay,
            "continuous batching": a.settings.continuous_batching, "response timeout s": a.settings.response_timeout,
        } for a in archives]), hide_index=True)
    else:
        st.info(f"No archives in {process.model_store}: Start builds {DEFAULT_ARCHIVE}, or run ./package_llama.sh")

    st.subheader("Registered models")
    if not status.running:
        st.info("TorchServe is stopped: start it on the Server tab.")
    elif not models:
        st.info("No model is registered.")
    else:
        st.dataframe(pd.DataFrame([{
            "model": m.name, "version": m.version, "default": m.is_default, "archive": m.archive,
            "workers": f"{sum(w.get('status') == 'READY' for w in m.workers)}/{len(m.workers)} ready",
            "min/max workers": f"{m.settings.min_workers}/{m.settings.max_workers}",
            "batch size": m.settings.batch_size, "batch delay ms": m.settings.max_batch_delay,
            "continuous batching": m.settings.continuous_batching,
            "response timeout s": m.settings.response_timeout,
        } for m in models]), hide_index=True)

    if status.running and archives:
        with st.form("register_form"):
            st.markdown("**Register an archive**")
            archive_file = st.selectbox("Archive", [a.file for a in archives], key="reg_archive")
            chosen = next(a for a in archives if a.file == archive_file).settings
            c1, c2, c3 = st.columns(3)
            reg_workers = c1.number_input("Workers", 1, 16, chosen.min_workers, key="reg_workers")
            reg_batch = c2.number_input("Batch size", 1, 64, chosen.batch_size, key="reg_batch")
            reg_delay = c3.number_input("Max batch delay (ms)", 0, 10_000, chosen.max_batch_delay, key="reg_delay")
            reg_timeout = c1.number_input("Response timeout (s)", 1, 3600, chosen.response_timeout,
                                          key="reg_timeout")
            reg_continuous = c2.checkbox("Continuous batching", chosen.continuous_batching, key="reg_continuous")
            if st.form_submit_button("Register"):
                wanted = ModelSettings(min_workers=reg_workers, max_workers=reg_workers, batch_size=reg_batch,
                                       max_batch_delay=reg_delay, response_timeout=reg_timeout,
                                       continuous_batching=reg_continuous)
                run_action(f"Registering {archive_file}", lambda step: admin.register_archive(
                    client, process.model_store, archive_file, wanted, on_step=step))

    if models:
        labels = {f"{m.name} {m.version}": m for m in models}
        pick_col, unreg_col, default_col = st.columns([3, 1, 1])
        picked = labels[pick_col.selectbox("Model version", list(labels), key="picked_version")]
        if unreg_col.button("Unregister", key="unregister"):
            run_action(f"Unregistering {picked.name} {picked.version}",
                       lambda step: client.unregister(picked.name, picked.version))
        if default_col.button("Set default", key="set_default"):
            run_action(f"Making {picked.version} the default of {picked.name}",
                       lambda step: client.set_default_version(picked.name, picked.version))

# ---- tuning ----------------------------------------------------------------------------

with tuning_tab:
    defaults = {m.name: m for m in models if m.is_default}
    if not defaults:
        st.info("Register a model first (Models tab).")
    else:
        name = st.selectbox("Model", list(defaults), key="tune_model")
        current = defaults[name]
        st.caption(f"Serving version {current.version}: {len(current.workers)} worker(s), "
                   f"batch size {current.settings.batch_size}, batch delay {current.settings.max_batch_delay} ms, "
                   f"continuous batching {'on' if current.settings.continuous_batching else 'off'}")

        st.subheader("Workers (live)")
        if current.settings.continuous_batching:
            st.warning("With continuous batching on, chats hung in our tests once a version had more than one "
                       "worker (see docs/admin-console.md). Keep one worker per version, or switch continuous "
                       "batching off below before scaling up.")
        # Forms: the inputs rerun the page only when submitted, not at every change.
        with st.form("scale_form"):
            w1, w2 = st.columns(2)
            min_workers = w1.number_input("Min workers", 0, 16, current.settings.min_workers, key="min_workers")
            max_workers = w2.number_input("Max workers", 0, 16, current.settings.max_workers, key="max_workers")
            if st.form_submit_button("Scale workers", key="scale"):
                run_action(f"Scaling {name} to {min_workers}–{max_workers} workers", lambda step: admin.scale_workers(
                    client, name, int(min_workers), int(max_workers), version=current.version))

        st.subheader("Batching (without dropping chats)")
        st.caption("TorchServe cannot change these on a running model: the console registers them as a new "
                   "version, waits for its workers, makes it the default, lets chats in flight on the old "
                   "version finish, then unregisters the old version.")
        with st.form("batching_form"):
            b1, b2, b3 = st.columns(3)
            new_batch = b1.number_input("Batch size", 1, 64, current.settings.batch_size, key="tune_batch")
            new_delay = b2.number_input("Max batch delay (ms)", 0, 10_000, current.settings.max_batch_delay,
                                        key="tune_delay")
            new_continuous = b3.checkbox("Continuous batching", current.settings.continuous_batching,
                                         key="tune_continuous")
            if st.form_submit_button("Apply batch settings", key="swap"):
                workers_now = max(1, len(current.workers))
                wanted = ModelSettings(min_workers=workers_now,
                                       max_workers=max(workers_now, current.settings.max_workers),
                                       batch_size=new_batch, max_batch_delay=new_delay,
                                       response_timeout=current.settings.response_timeout,
                                       continuous_batching=new_continuous)
                run_action(f"Changing batch settings of {name}", lambda step: "Now serving version "
                           + admin.swap_settings(client, process.model_store, name, wanted, on_step=step))

# ---- status ----------------------------------------------------------------------------

with status_tab:
    @st.fragment(run_every=refresh_s)
    def live_status():
        live = process.client(timeout=5)
        try:
            now_models = admin.registered_models(live) if process.is_running() else []
        except TorchServeError as e:
            st.warning(f"TorchServe did not answer: {e.message}")
            return
        st.caption(f"Read from the server at {datetime.now():%H:%M:%S}, every {refresh_s} s")
        if not process.is_running():
            st.info("TorchServe is stopped.")
            return
        rows = admin.worker_rows(now_models)
        st.markdown(f"**Workers** — {sum(r['status'] == 'READY' for r in rows)} READY of {len(rows)}")
        st.dataframe(pd.DataFrame(rows, columns=["model", "version", "worker", "status", "pid", "memory MB",
                                                 "started"]), hide_index=True)
        st.markdown("**Job queue**")
        st.dataframe(pd.DataFrame(admin.queue_rows(now_models),
                                  columns=["model", "version", "pending requests", "free queue places"]),
                     hide_index=True)

    live_status()

# ---- metrics ---------------------------------------------------------------------------

with metrics_tab:
    @st.fragment(run_every=refresh_s)
    def live_metrics():
        history = st.session_state.setdefault("metrics_history", admin.MetricsHistory())
        if not process.is_running():
            st.info("TorchServe is stopped.")
            return
        try:
            snap = admin.snapshot(process.client(timeout=5))
        except TorchServeError as e:
            st.warning(f"Metrics are not available: {e.message}")
            return
        history.add(snap)
        totals = snap.totals
        c = st.columns(5)
        rate = history.rate("llama_tokens_generated")
        c[0].metric("Generated tokens/s (now)", "–" if rate is None else f"{rate:.1f}")
        c[1].metric("Tokens generated", f"{totals.get('llama_tokens_generated', 0):.0f}")
        ttft = totals.get("llama_time_to_first_token_ms")
        c[2].metric("Time to first token (last)", "–" if ttft is None else f"{ttft:.0f} ms")
        c[3].metric("Slots active / free", f"{totals.get('llama_slots_active', 0):.0f} / "
                                           f"{totals.get('llama_slots_free', 0):.0f}")
        reuse = admin.prompt_cache_reuse(totals)
        c[4].metric("Prompt-cache reuse", "–" if reuse is None else f"{reuse:.0%}")

        frame = pd.DataFrame(history.rows())
        if len(frame) > 1:
            frame["time"] = pd.to_datetime(frame["time"], unit="s")
            frame = frame.set_index("time")
            left, right = st.columns(2)
            left.caption("Tokens per second (from counter deltas)")
            left.line_chart(frame[["generated tokens/s", "prompt tokens/s"]], height=200)
            right.caption("Slots")
            right.line_chart(frame[["llama_slots_active", "llama_slots_free"]], height=200)
        else:
            st.caption("Charts appear after the next refresh.")

        left, right = st.columns(2)
        left.markdown("**Llama handler counters**")
        left.dataframe(pd.DataFrame(
            [{"metric": k, "value": totals.get(k)} for k in admin.LLAMA_COUNTERS + admin.LLAMA_GAUGES]
            + [{"metric": f"llama_requests_finished{{Reason={r}}}", "value": v}
               for r, v in sorted(snap.finished_by_reason.items())]), hide_index=True)
        right.markdown("**TorchServe metrics**")
        right.dataframe(pd.DataFrame([{"metric": k, "value": totals.get(k)} for k in admin.TS_METRICS]),
                        hide_index=True)

    live_metrics()

# ---- security --------------------------------------------------------------------------

with security_tab:
    st.caption(f"Token authorization is on. Keys: `{process.key_file}` (rewritten at each start).")
    try:
        keys = Keys.from_key_file(process.key_file) if status.running else None
    except (OSError, ValueError):
        keys = None
    if keys is None:
        st.info("No keys: TorchServe is stopped (it writes new keys at each start).")
    else:
        show = st.toggle("Show the inference key", key="show_key")
        st.text_input("Inference key (give this to chat clients)",
                      keys.inference if show else admin.mask_key(keys.inference), disabled=True, key=None)
        st.text_input("Management key (this console uses it)", admin.mask_key(keys.management), disabled=True)
        r1, r2, _ = st.columns([1, 1, 3])
        if r1.button("Rotate inference key", key="rotate_inference"):
            run_action("Rotating the inference key", lambda step: client.rotate_key("inference") and
                       "New inference key issued: chat clients need it now")
        if r2.button("Rotate management key", key="rotate_management"):
            run_action("Rotating the management key", lambda step: client.rotate_key("management") and
                       "New management key issued")
