"""Typer application and the error boundary shared by all commands."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import typer

from bench.errors import BenchError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="bench",
    help="Robustness benchmarking harness and leaderboard for image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts contain literal [brackets]
)


def _version(value: bool) -> None:
    if value:
        import bench

        typer.echo(f"bench {bench.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Robustness benchmarking harness and leaderboard for image classifiers."""


def user_errors(fn: F) -> F:
    """Turn :class:`BenchError` into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from bench.cli.output import error

        try:
            return fn(*args, **kwargs)
        except BenchError as exc:
            error(str(exc))
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted; stored rows are kept and a re-run resumes where this one stopped")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps: it has fn's signature


def main() -> None:
    app()


from bench.cli import commands  # noqa: E402,F401 - registers the commands on import

if __name__ == "__main__":  # pragma: no cover
    main()
