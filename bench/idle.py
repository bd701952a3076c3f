"""The idle-connections scenario of `make bench`: IDLE connections that send nothing, each
opened again as soon as the server closes it, and meanwhile a new client's GETs, each on a
connection of its own, timed. Loopback only; it stops by itself after its probes.

A slot-holding attack as much as a crowd of idle keep-alive clients: the question is
whether a server whose worker_connections they fill still lets a new client in.
"""

import asyncio
import resource
import statistics
import time

IDLE = 5_000
PROBES = 10
PROBE_EVERY = 1.0  # seconds between two probes
PROBE_TIMEOUT = 5.0  # seconds a probe waits for its answer at most
FILL_SECONDS = 10.0  # at most, for the idle connections to be opened before the probes


def allow_files(needed):
    """Raise this process's soft limit on open files to the hard one; whether `needed`
    files fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed


async def hold(port, stop, counts):
    """One idle connection, opened again whenever the server closes it, until `stop`."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection('127.0.0.1', port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        counts['open'] += 1
        counts['opened'] += 1
        try:
            read = asyncio.ensure_future(reader.read(1))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (read, stopped):
                task.cancel()
        finally:
            counts['open'] -= 1
            writer.close()


async def probe(port, person_id):
    """Seconds until a new connection's GET is answered, or None past PROBE_TIMEOUT."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection('127.0.0.1', port)
            writer.write(f'GET /person/{person_id} HTTP/1.1\r\nHost: bench\r\n'
                         'Connection: close\r\n\r\n'.encode())
            status = await reader.readline()
            writer.close()
    except (TimeoutError, OSError):
        return None
    return time.monotonic() - started if b' 200 ' in status else None


async def scenario(port, idle=IDLE, probes=PROBES):
    stop, counts = asyncio.Event(), {'open': 0, 'opened': 0}
    holders = [asyncio.ensure_future(hold(port, stop, counts)) for _ in range(idle)]
    deadline = time.monotonic() + FILL_SECONDS
    while counts['open'] < idle and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    filled = counts['open']
    seconds = []
    for number in range(probes):
        seconds.append(await probe(port, 1 + number))
        await asyncio.sleep(PROBE_EVERY)
    held = counts['open']
    stop.set()
    await asyncio.gather(*holders, return_exceptions=True)
    answered = [s for s in seconds if s is not None]
    return {'idle': idle, 'filled': filled, 'held': held, 'opened': counts['opened'],
            'probes': probes, 'answered': len(answered),
            'within_1s': sum(s <= 1.0 for s in answered),
            'p50_ms': 1000 * statistics.median(answered) if answered else None,
            'max_ms': 1000 * max(answered) if answered else None}


def run(port, idle=IDLE, probes=PROBES):
    """The scenario against the server on `port`: its figures."""
    return asyncio.run(scenario(port, idle, probes))
