"""What every feed and source is doing now: `GET /status` (JSON) and the page at `/` built from it.

For an operator without Grafana at hand. Per feed and SFTP source: its state
(waiting for Kafka, starting, running, failing, stopped), its cursor, its last poll and
how it ended, when it polls next, the event lag, events and dead letters confirmed in
the last hour, and the last error in words. The same board gives /readyz its reasons
for a process that is still starting or has a stopped feed.

Nothing here holds a secret: error texts name a URL's path, never its query or body,
and the settings shown are names, never passwords.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from streamer import __version__
from streamer.metrics import Metrics
from streamer.scheduler import FeedRunner, Runner, SftpRunner

REFRESH_S = 10


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class StatusBoard:
    """The state of every configured source; the runners are attached once they exist."""

    def __init__(
        self,
        metrics: Metrics,
        configured: Sequence[tuple[str, str]],
        *,
        kafka_servers: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.configured = list(configured)  # (kind, name): "feed"/"sftp"
        self.kafka_servers = kafka_servers
        self._clock = clock
        self.started_at = clock()
        self._lock = threading.Lock()
        self._runners: dict[tuple[str, str], Runner] = {}
        self._waiting: str | None = "starting"  # why the sources do not run yet

    def waiting(self, reason: str | None) -> None:
        """Why the sources do not run yet (e.g. waiting for Kafka); None once they do."""
        with self._lock:
            self._waiting = reason

    def attach(self, runners: Sequence[Runner]) -> None:
        """The runners now exist; the sources run from here on."""
        with self._lock:
            for runner in runners:
                self._runners[(runner.kind, runner.name)] = runner
            self._waiting = None

    def detach(self, names: Sequence[str]) -> None:
        """These sources run elsewhere now (cluster mode: their unit moved away)."""
        with self._lock:
            for key in [key for key in self._runners if key[1] in names]:
                del self._runners[key]

    def problems(self) -> list[str]:
        """What /readyz reports beside Kafka: still starting, or a source stopped."""
        with self._lock:
            waiting, runners = self._waiting, list(self._runners.values())
        found = [f"not started yet: {waiting}"] if waiting else []
        for runner in runners:
            if runner.error is not None:
                found.append(f"{runner.kind} {runner.name} stopped: {runner.last_error_text}")
        return found

    def snapshot(self) -> dict[str, Any]:
        """The /status document."""
        with self._lock:
            waiting, runners = self._waiting, dict(self._runners)
        now = self._clock()
        sources = [
            self._source(kind, name, runners.get((kind, name)), waiting, now)
            for kind, name in self.configured
        ]
        problems = self.problems()
        return {
            "service": "cdr-streamer",
            "version": __version__,
            "now": _iso(now),
            "started_at": _iso(self.started_at),
            "kafka": {"bootstrap_servers": self.kafka_servers, "waiting": waiting},
            "problems": problems,
            "sources": sources,
        }

    def _source(
        self, kind: str, name: str, runner: Runner | None, waiting: str | None, now: float
    ) -> dict[str, Any]:
        feed_metrics = self.metrics.feeds.get(name)
        events, dead_letters = feed_metrics.recent.last_hour() if feed_metrics else (0, 0)
        lag = feed_metrics.lag_s() if feed_metrics else None
        out: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "state": "waiting" if runner is None else _state(runner),
            "cursor": None if runner is None else _cursor(runner),
            "last_poll": None,
            "next_poll_at": None,
            "failures_in_a_row": 0,
            "lag_s": None if lag is None else round(lag, 1),
            "last_hour": {"events": events, "dead_letters": dead_letters},
            "last_error": None,
        }
        if runner is None:
            out["last_error"] = waiting
            return out
        if runner.last_poll_at is not None:
            out["last_poll"] = {
                "at": _iso(runner.last_poll_at),
                "seconds_ago": round(now - runner.last_poll_at, 1),
                "ok": runner.last_poll_ok,
                "summary": runner.last_summary if runner.last_poll_ok else runner.last_error_text,
            }
        out["next_poll_at"] = _iso(runner.next_poll_at) if runner.error is None else None
        out["failures_in_a_row"] = runner.failures
        if runner.last_error_text:
            out["last_error"] = runner.last_error_text
        return out

    def json_page(self) -> tuple[str, bytes]:
        body = json.dumps(self.snapshot(), indent=2) + "\n"
        return "application/json", body.encode("utf-8")

    def html_page(self) -> tuple[str, bytes]:
        return "text/html; charset=utf-8", render_html(self.snapshot()).encode("utf-8")

    def pages(self) -> Mapping[str, Callable[[], tuple[str, bytes]]]:
        """The paths this board serves (HealthServer's `pages`)."""
        return {"/status": self.json_page, "/": self.html_page}


def _state(runner: Runner) -> str:
    if runner.error is not None:
        return "stopped"
    if runner.failures:
        return "failing"
    if runner.last_poll_ok is None:  # the first poll has not ended yet
        return "starting"
    return "running"


def _cursor(runner: Runner) -> Any:
    if isinstance(runner, FeedRunner):
        return runner.pipeline.last_cursor
    if isinstance(runner, SftpRunner):
        cursor = runner.collector.loaded_cursor
        if cursor is None:
            return None
        done = sum(1 for state in cursor.files.values() if state == "done")
        return {"files_done": done, "current": cursor.current, "rows": cursor.rows}
    return None


_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .45em .7em; border-bottom: 1px solid #ddd;
         vertical-align: top; }
th { background: #f3f3f3; }
.badge { display: inline-block; padding: .1em .6em; border-radius: .8em; font-weight: bold;
         color: #fff; background: #2e7d32; }
tr.state-stopped td { background: #ffebee; }
tr.state-stopped .badge { background: #c62828; }
tr.state-failing td { background: #fff8e1; }
tr.state-failing .badge { background: #ef6c00; }
tr.state-waiting .badge, tr.state-starting .badge { background: #616161; }
.problems { background: #b71c1c; color: #fff; padding: .6em 1em; border-radius: .3em; }
.ok { background: #2e7d32; color: #fff; padding: .6em 1em; border-radius: .3em; }
.error { color: #b71c1c; }
small { color: #666; }
"""


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _lag(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _cursor_text(cursor: Any) -> str:
    if cursor is None:
        return "-"
    if isinstance(cursor, dict):
        where = f", {cursor['current']} row {cursor['rows']}" if cursor.get("current") else ""
        return f"{cursor['files_done']} files done{where}"
    return str(cursor)


def render_html(status: Mapping[str, Any]) -> str:
    """The status page: one row per feed and source, a failing one marked in colour and words."""
    e = html.escape
    rows = []
    for s in status["sources"]:
        poll = s["last_poll"]
        if poll is None:
            last = "<small>none yet</small>"
        else:
            outcome = "ok" if poll["ok"] else '<span class="error">failed</span>'
            last = f"{outcome} <small>{e(_ago(poll['seconds_ago']))}</small>"
            if poll["summary"]:
                last += f"<br><small>{e(poll['summary'])}</small>"
        error = s["last_error"] or ""
        failures = f" ({s['failures_in_a_row']} in a row)" if s["failures_in_a_row"] else ""
        rows.append(
            f'<tr class="source state-{e(s["state"])}" data-name="{e(s["name"])}" '
            f'data-state="{e(s["state"])}">'
            f"<td><b>{e(s['name'])}</b> <small>{e(s['kind'])}</small></td>"
            f'<td><span class="badge">{e(s["state"].upper())}</span>{e(failures)}</td>'
            f"<td>{e(_cursor_text(s['cursor']))}</td>"
            f"<td>{last}</td>"
            f"<td>{e(_lag(s['lag_s']))}</td>"
            f"<td>{s['last_hour']['events']}</td>"
            f"<td>{s['last_hour']['dead_letters']}</td>"
            f'<td class="error">{e(error)}</td>'
            "</tr>"
        )
    if status["problems"]:
        items = "".join(f"<li>{e(p)}</li>" for p in status["problems"])
        summary = f'<div class="problems" id="summary">Not ready:<ul>{items}</ul></div>'
    else:
        summary = '<div class="ok" id="summary">Every feed and source is running.</div>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>cdr-streamer status</title><style>{_STYLE}</style></head><body>"
        f"<h1>cdr-streamer {e(status['version'])}</h1>"
        f"<p><small>Kafka {e(status['kafka']['bootstrap_servers'])}; started "
        f"{e(status['started_at'] or '')}; page built {e(status['now'] or '')}, refreshed "
        f'every {REFRESH_S} s. JSON: <a href="/status">/status</a>, also '
        '<a href="/metrics">/metrics</a> <a href="/readyz">/readyz</a></small></p>'
        f"{summary}"
        "<table><thead><tr><th>Feed / source</th><th>State</th><th>Cursor</th>"
        "<th>Last poll</th><th>Event lag</th><th>Events (1 h)</th><th>Dead letters (1 h)</th>"
        "<th>Last error</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></body></html>\n"
    )
