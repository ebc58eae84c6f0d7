import type { AdminService, BackupAdmin, VolumeService } from "./types.js";

/**
 * A VolumeService that holds requests until the real one is ready. The socket
 * must answer within seconds of the plugin starting, while recovering the pool
 * can take longer; requests wait for it (Docker allows a minute or more) or get
 * the start-up error.
 */
export class DeferredVolumeService implements VolumeService {
  private readonly ready: Promise<VolumeService & AdminService>;
  private resolve!: (s: VolumeService & AdminService) => void;
  private backupService: BackupAdmin | undefined;
  private reject!: (e: unknown) => void;

  constructor() {
    this.ready = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.ready.catch(() => undefined);
  }

  serve(service: VolumeService & AdminService, backups: BackupAdmin): void {
    this.backupService = backups;
    this.resolve(service);
  }

  /** The backup service, once start-up is done; the start-up error otherwise. */
  async backups(): Promise<BackupAdmin> {
    await this.ready;
    return this.backupService as BackupAdmin;
  }

  /** The admin API's service, once start-up is done; the start-up error otherwise. */
  admin(): Promise<AdminService> {
    return this.ready;
  }

  fail(err: unknown): void {
    this.reject(err);
  }

  async create(name: string, options: Readonly<Record<string, string>> | null) {
    return (await this.ready).create(name, options);
  }
  async remove(name: string) {
    return (await this.ready).remove(name);
  }
  async mount(name: string, id: string) {
    return (await this.ready).mount(name, id);
  }
  async unmount(name: string, id: string) {
    return (await this.ready).unmount(name, id);
  }
  async path(name: string) {
    return (await this.ready).path(name);
  }
  async get(name: string) {
    return (await this.ready).get(name);
  }
  async list() {
    return (await this.ready).list();
  }
}
