"""``edgeexit devices``: the detected device, its profile, providers and energy meters."""

from __future__ import annotations

from pathlib import Path

import click

from .._logging import logging_options
from ._shared import check_outputs, check_suffix, emit_json


@click.command()
@logging_options()
@click.option("--device", default="auto", show_default=True, help="Profile to show (auto: detect).")
@click.option("--json", "as_json", is_flag=True, help="Print the same as one JSON object on stdout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON to this file.")
def devices(device: str, as_json: bool, output: Path | None) -> None:
    """Show the detected device, its profile, providers and energy meters."""
    check_outputs(output)
    check_suffix(output, (".json",))
    import dataclasses

    from ..devices import available_providers, detect, detect_meters, get_profile

    found = detect()
    profile = get_profile(device)
    if as_json or output is not None:
        emit_json("devices", {
            "detected": dataclasses.asdict(found), "profile": dataclasses.asdict(profile),
            "providers_available": available_providers(),
            "meters": [{"name": name, "readable": ok, "why": why} for name, ok, why in detect_meters()],
        }, as_json, output)
        if as_json:
            return
    click.echo(f"detected: {found.profile} ({found.reason}); machine {found.machine}"
               + (f", model {found.model!r}" if found.model else ""))
    click.echo(f"profile: {profile.name} — {profile.description}")
    available = available_providers()
    click.echo(f"providers available: {', '.join(available)}")
    marks = [f"{p} ({'ok' if p in available else 'MISSING'})" for p in profile.provider_names]
    click.echo(f"providers requested: {', '.join(marks)}")
    click.echo(f"threads: {profile.threads} per stage session, spinning {'on' if profile.spinning else 'off'}, "
               f"global pool {'yes' if profile.global_thread_pool else 'no'}")
    p = profile.power
    click.echo(f"power figures for estimates: idle {p.idle_watts:g} W, busy {p.busy_watts:g} W ({p.source})")
    click.echo("energy meters:")
    for name, ok, why in detect_meters():
        star = "*" if name in profile.energy_meters else " "
        click.echo(f" {star} {name:<9} {'readable' if ok else 'not readable'}: {why}")
    click.echo("(* = in this profile's order of preference: " + ", ".join(profile.energy_meters) + ")")


# --- quickstart ---------------------------------------------------------------------
