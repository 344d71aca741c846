"""One line per test of a pytest junit report, for scripts/gpu_check.sh's summary:

    python scripts/junit_summary.py REPORT.xml    # name <TAB> pass|fail|skip <TAB> detail

A failure's detail is its most telling line, not the head of pytest's message: the last
exception a failed subprocess printed (`DistNetworkError: ... EADDRINUSE`, `TypeError: ...`),
else the failed assertion (`assert 0 == 75`), else the message's head. On the H200 the heads
were the first of a subprocess's stderr (a warning), which named none of the three causes.
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

EXCEPTION = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Expired|Exit)"
                       r"\b:?.*)$")
ASSERTION = re.compile(r"^(assert .*)$")
WIDTH = 300


def telling(message: str, text: str) -> str:
    """The line of a failure that says why (see the module doc), at most WIDTH characters."""
    lines = [ln[1:].strip() for ln in (text or "").splitlines() if ln.startswith("E ")]
    # an assert's own message opens with "AssertionError: " + its head: not a cause printed
    printed = lines[1:] if lines and lines[0].startswith("AssertionError") else lines
    found = [m.group(1) for ln in printed if (m := EXCEPTION.match(ln))] \
        or [m.group(1) for ln in lines if (m := ASSERTION.match(ln))]
    return (found[-1] if found else " ".join((message or "").split()))[:WIDTH]


def summary(path: str) -> list[tuple[str, str, str]]:
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        return [("tests", "fail", "no junit report: pytest timed out or crashed (see "
                 "gpu_tests.log)")]
    out = []
    for c in cases:
        name = f"test {c.get('name')}"
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            out.append((name, "fail", telling(bad.get("message"), bad.text)))
        elif c.find("skipped") is not None:
            out.append((name, "skip", (c.find("skipped").get("message") or "")[:WIDTH]))
        else:
            out.append((name, "pass", f"{float(c.get('time', 0)):.1f} s"))
    return out


if __name__ == "__main__":
    for row in summary(sys.argv[1]):
        print("\t".join(x.replace("\t", " ").replace("\n", " ") for x in row))
