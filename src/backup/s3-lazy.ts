import { checkS3Settings, parseS3Url, type S3Settings } from "./s3-settings.js";
import type { BackupStore } from "./store.js";

/**
 * An S3 target whose client (the AWS SDK, most of the server's code) is loaded on its
 * first request, not when the server starts: a plugin that never backs up to S3 neither
 * pays the SDK's start-up time nor keeps it in memory. The URL and the settings are
 * checked at once, so a bad target is refused before anything runs.
 */
export class LazyS3Store implements BackupStore {
  private store: Promise<BackupStore & { close(): void }> | undefined;

  constructor(
    readonly url: string,
    private readonly settings: S3Settings,
  ) {
    parseS3Url(url);
    checkS3Settings(settings);
  }

  /** The real store, made on first use. */
  loaded(): Promise<BackupStore & { close(): void }> {
    this.store ??= import("./s3-store.js").then((m) => new m.S3Store(this.url, this.settings));
    return this.store;
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    return (await this.loaded()).put(key, data);
  }
  async get(key: string): Promise<Uint8Array | undefined> {
    return (await this.loaded()).get(key);
  }
  async has(key: string): Promise<boolean> {
    return (await this.loaded()).has(key);
  }
  async list(prefix: string): Promise<string[]> {
    return (await this.loaded()).list(prefix);
  }
  async delete(key: string): Promise<void> {
    return (await this.loaded()).delete(key);
  }
  /** Closes the client's idle connections, if it was ever made. */
  async close(): Promise<void> {
    if (this.store) (await this.store).close();
  }
}
