"""The picture of a plan, for people who would rather look than read: memory per device as
bars, one decoded token's time split by component as a bar, and what would change the speed.
Each part has its own character as well as its own colour, so the picture reads the same
where rich prints no colour (a pipe, a file, NO_COLOR)."""

from __future__ import annotations

from rich.text import Text

from localv3.render import format_bytes
from localv3.offload.alternatives import Alternative
from localv3.offload.layout import DISK
from localv3.offload.planner import DeviceUse, Plan
from localv3.offload.roofline import CPU_EXPERTS, CPU_LAYERS, DISK_PART, FIXED_PART, GPU_PART, PCIE_PART

BAR_WIDTH = 48
MEMORY_PARTS = {  # part -> (character, colour)
    "weights": ("█", "green"),
    "KV cache": ("▓", "cyan"),
    "reserved": ("▒", "yellow"),
    "free": ("░", "bright_black"),
}
TIME_PARTS = {
    GPU_PART: ("█", "green"),
    CPU_EXPERTS: ("▓", "magenta"),
    CPU_LAYERS: ("▒", "blue"),
    DISK_PART: ("▚", "red"),
    PCIE_PART: ("≡", "yellow"),
    FIXED_PART: ("·", "bright_black"),
}


def picture(result: Plan, alternatives: tuple[Alternative, ...]) -> list[Text]:
    """The lines of the picture, in order."""
    lines = [Text("memory by device", style="bold")]
    width = max(len(d.name) for d in result.devices)
    lines += [_device_line(result, device, width) for device in result.devices]
    p = result.predicted
    total_ms = sum(p.decode_components.values()) * 1e3
    lines.append(Text(f"decode: {total_ms:.1f} ms per token ({p.decode_tok_s:.2f} tok/s)", style="bold"))
    times = {part: p.decode_components.get(part, 0.0) * 1e3 for part in TIME_PARTS}
    lines.append(Text("  ") + _bar(times, TIME_PARTS))
    lines.append(Text("  ") + _legend({part: f"{ms:.1f} ms" for part, ms in times.items() if ms > 0}, TIME_PARTS))
    lines.append(_alternatives_line(alternatives))
    return lines


def _device_line(result: Plan, device: DeviceUse, width: int) -> Text:
    kv = result.kv_cache.device_bytes.get(device.name, 0)
    sizes = {"weights": device.used_bytes - kv, "KV cache": kv, "reserved": device.reserved_bytes, "free": max(device.free_bytes or 0, 0)}
    line = Text(f"  {device.name:<{width}}  ")
    if device.name == DISK or device.capacity_bytes is None:
        return line + Text(f"{format_bytes(device.used_bytes)} of routed experts read from the model file per use")
    line += _bar(sizes, MEMORY_PARTS)
    line += Text(f"  {format_bytes(device.capacity_bytes)}: ")
    return line + _legend({part: format_bytes(n) for part, n in sizes.items() if n > 0}, MEMORY_PARTS)


def _bar(values: dict[str, float], parts: dict[str, tuple[str, str]]) -> Text:
    bar = Text()
    for part, cells in zip(values, _cells(list(values.values()), BAR_WIDTH)):
        character, colour = parts[part]
        bar.append(character * cells, style=colour)
    return bar


def _legend(labels: dict[str, str], parts: dict[str, tuple[str, str]]) -> Text:
    legend = Text()
    for i, (part, value) in enumerate(labels.items()):
        character, colour = parts[part]
        legend.append(("  " if i else "") + character, style=colour)
        legend.append(f" {part} {value}")
    return legend


def _alternatives_line(alternatives: tuple[Alternative, ...]) -> Text:
    line = Text("what would change it: ", style="bold")
    for i, alternative in enumerate(alternatives):
        speed = "does not fit" if alternative.decode_tok_s is None else f"{alternative.decode_tok_s:.2f} tok/s"
        line.append(("; " if i else "") + f"{alternative.change} -> ")
        line.append(speed, style="bold")
        if alternative.experts_on_disk:
            line.append(" (experts read from disk)")
    return line


def _cells(values: list[float], width: int) -> list[int]:
    """`width` cells shared in proportion to `values` (largest remainders), every non-zero value
    at least one cell where there are enough."""
    total = sum(values)
    if total <= 0:
        return [0] * len(values)
    exact = [v / total * width for v in values]
    cells = [int(x) for x in exact]
    for i in sorted(range(len(values)), key=lambda i: exact[i] - cells[i], reverse=True)[: width - sum(cells)]:
        cells[i] += 1
    for i, v in enumerate(values):
        if v > 0 and cells[i] == 0:
            donor = max(range(len(cells)), key=lambda j: cells[j])
            if cells[donor] > 1:
                cells[donor] -= 1
                cells[i] = 1
    return cells
