"""What a refusal looks like on stderr: one error line, after which nothing; progress bars and warnings alone may
come before it."""

import re

PROGRESS = re.compile(r"\[(\d+:)?\d\d:\d\d[<,]")  # a tqdm bar: "…| 40/40 [00:00<00:00, …]", "0batch [00:00, …]"
WARNING = re.compile(r"chip [a-z]+: warning: ")


def error_line(err):
    """The one line of an error on stderr, after which nothing else; progress bars, warnings and the training
    loop's precision line (one line each) alone may come before it."""
    assert err.endswith("\n") and "Traceback" not in err, err
    *before, line = err[:-1].split("\n")  # not splitlines: a bar's updates are separated by carriage returns
    for b in before:
        last = b.split("\r")[-1]
        assert PROGRESS.search(b) or WARNING.match(last) or last.startswith("precision: "), err
    assert "\r" not in line, err
    return line


def assert_refused(result, *wanted):
    """Exit code 2, nothing on stdout, one error line on stderr naming each of `wanted`, no traceback."""
    code, out, err = result
    assert code == 2, err
    assert out == "", out
    line = error_line(err)
    assert line.startswith("chip ") and ": error: " in line, err
    for w in wanted:
        assert str(w) in line, err


def fill(args, **paths):
    """A command line with {name} replaced by paths[name]."""
    return [a.format(**paths) for a in args]
