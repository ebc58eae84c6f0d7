/**
 * One lock per key. Work on a key runs one at a time, in arrival order; work on
 * different keys runs side by side.
 */
export class KeyedLock {
  private readonly tails = new Map<string, Promise<void>>();

  async with<T>(keys: string | readonly string[], work: () => Promise<T>): Promise<T> {
    // Taking several keys in sorted order means two callers can never wait on each other.
    const sorted = [...new Set(typeof keys === "string" ? [keys] : keys)].sort();
    const releases: (() => void)[] = [];
    try {
      for (const key of sorted) releases.push(await this.acquire(key));
      return await work();
    } finally {
      for (const release of releases.reverse()) release();
    }
  }

  private async acquire(key: string): Promise<() => void> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const current = new Promise<void>((resolve) => (release = resolve));
    const tail = previous.then(() => current);
    this.tails.set(key, tail);
    await previous;
    return () => {
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    };
  }
}
