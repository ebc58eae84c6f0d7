/**
 * Runs `work` on every item with at most `limit` at once, and stops taking new items after
 * the first failure (which it then throws). Blocks are independent, and a remote store's
 * latency would otherwise dominate; a few at once keep memory at a few blocks.
 */
export async function forEachConcurrently<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next++] as T;
      try {
        await work(item);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(limit, items.length) }, worker));
  const rejected = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (rejected) throw rejected.reason;
}

/** Blocks in flight at once. */
export const DEFAULT_CONCURRENCY = 4;
