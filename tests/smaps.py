"""/proc/self/smaps, read by the tests that check how the kernel holds our maps (Linux only)."""


def mapping_field(address: int, name: str) -> list[str]:
    """The values of field `name` ("Rss", "VmFlags", ...) of this process's mapping that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == f"{name}:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x} with a {name} field")
