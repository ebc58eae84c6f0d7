import { mkdtemp, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { CloneOptions, Pool, PoolUsage, SnapshotReader, VolumeRange } from "../../src/pool/types.js";

export interface FakeVolume {
  size: number;
  active: boolean;
  origin?: string;
  /** Set when a filesystem was made on the device (see format()); a clone has its origin's. */
  formatted: boolean;
  /** Stands for the volume's contents: a clone starts with its origin's. */
  data: string;
}

const DEVICE_PREFIX = "/dev/fake/";

/**
 * An in-memory pool that behaves like a real one from the volume layer's side: it
 * refuses a name it holds, each call is all or nothing, and its volumes outlive a
 * crash of the volume manager that uses it.
 */
export class FakePool implements Pool {
  readonly driver = "loop" as const;
  readonly volumes = new Map<string, FakeVolume>();
  /** Snapshots by `volume@snapshot`: frozen copies of a volume. */
  readonly snaps = new Map<string, FakeVolume>();
  readonly clones: { name: string; origin: string; options: CloneOptions }[] = [];
  dataTotalBytes = 100 * 1024 ** 3;
  dataUsedBytes = 0;
  hostReservedBytes: number | undefined;
  hostFreeBytes: number | undefined;
  /** Set to make the next create or clone fail with this message. */
  failNext: string | undefined;
  /** Set to make the next remove fail with this message and keep the volume, as a busy device does. */
  failRemoveNext: string | undefined;

  async open() {}
  async close() {}
  async list() {
    return [...this.volumes.keys()].sort();
  }
  private take(): void {
    const f = this.failNext;
    this.failNext = undefined;
    if (f !== undefined) throw new Error(f);
  }
  async create(name: string, sizeBytes: number) {
    if (this.volumes.has(name)) throw new Error(`"${name}" exists`);
    this.take();
    this.volumes.set(name, { size: sizeBytes, active: false, formatted: false, data: "" });
  }
  async clone(name: string, origin: string, options: CloneOptions = {}) {
    const o = options.snapshot === undefined ? this.volumes.get(origin) : this.snaps.get(`${origin}@${options.snapshot}`);
    if (!o) throw new Error(`no origin "${origin}"`);
    if (this.volumes.has(name)) throw new Error(`"${name}" exists`);
    this.take();
    this.clones.push({ name, origin, options });
    this.volumes.set(name, { size: o.size, active: false, origin, formatted: o.formatted, data: o.data });
  }
  private need(name: string) {
    const v = this.volumes.get(name);
    if (!v) throw new Error(`no volume "${name}" in the pool`);
    return v;
  }
  async sizeOf(name: string) {
    return this.need(name).size;
  }
  async activate(name: string) {
    this.need(name).active = true;
    return DEVICE_PREFIX + name;
  }
  async attached() {
    return new Set([...this.volumes].filter(([, v]) => v.active).map(([name]) => name));
  }
  async deactivate(name: string) {
    const v = this.volumes.get(name);
    if (v) v.active = false;
  }
  async remove(name: string) {
    const f = this.failRemoveNext;
    this.failRemoveNext = undefined;
    if (f !== undefined && this.volumes.has(name)) throw new Error(f);
    this.volumes.delete(name);
  }
  async usage(): Promise<PoolUsage> {
    const u: PoolUsage = { driver: "loop", dataTotalBytes: this.dataTotalBytes, dataUsedBytes: this.dataUsedBytes };
    if (this.hostReservedBytes !== undefined) u.hostReservedBytes = this.hostReservedBytes;
    if (this.hostFreeBytes !== undefined) u.hostFreeBytes = this.hostFreeBytes;
    return u;
  }
  async allocatedBytes() {
    return 0;
  }
  active(): string[] {
    return [...this.volumes].filter(([, v]) => v.active).map(([n]) => n);
  }
  /** The volume behind a device path this pool handed out, if it still exists. */
  volumeAt(device: string): FakeVolume | undefined {
    return device.startsWith(DEVICE_PREFIX) ? this.volumes.get(device.slice(DEVICE_PREFIX.length)) : undefined;
  }
  /** What mkfs does to the device: a fresh, empty filesystem. */
  format(device: string): void {
    const v = this.volumeAt(device);
    if (!v) throw new Error(`mkfs: ${device} does not exist`);
    v.formatted = true;
    v.data = "";
  }

  async resize(name: string, sizeBytes: number) {
    const v = this.need(name);
    if (sizeBytes < v.size) throw new Error(`cannot shrink "${name}"`);
    v.size = sizeBytes;
  }
  async snapshot(volume: string, snapshot: string, options: CloneOptions = {}) {
    const v = this.need(volume);
    const key = `${volume}@${snapshot}`;
    if (this.snaps.has(key)) throw new Error(`snapshot "${key}" exists`);
    this.take();
    this.clones.push({ name: key, origin: volume, options });
    this.snaps.set(key, { ...v, active: false });
  }
  async snapshots() {
    const out = new Map<string, string[]>();
    for (const key of [...this.snaps.keys()].sort()) {
      const [volume = "", snap = ""] = key.split("@");
      out.set(volume, [...(out.get(volume) ?? []), snap]);
    }
    return out;
  }
  private needSnap(volume: string, snapshot: string) {
    const s = this.snaps.get(`${volume}@${snapshot}`);
    if (!s) throw new Error(`no snapshot "${volume}@${snapshot}" in the pool`);
    return s;
  }
  async snapshotSizeOf(volume: string, snapshot: string) {
    return this.needSnap(volume, snapshot).size;
  }
  async snapshotAllocatedBytes(volume: string, snapshot: string) {
    this.needSnap(volume, snapshot);
    return 0;
  }
  async removeSnapshot(volume: string, snapshot: string) {
    this.snaps.delete(`${volume}@${snapshot}`);
  }
  async rollback(volume: string, snapshot: string) {
    const v = this.need(volume);
    if (v.active) throw new Error(`"${volume}" is attached`);
    const s = this.needSnap(volume, snapshot);
    Object.assign(v, { size: s.size, data: s.data, formatted: s.formatted });
  }
  async grow(sizeBytes: number) {
    if (sizeBytes < this.dataTotalBytes) throw new Error("a pool only grows");
    this.dataTotalBytes = sizeBytes;
  }
  /** Open snapshot readers, by `volume@snapshot`. */
  readonly readers = new Map<string, number>();
  /** The snapshot's data at offset 0 of a sparse file of its size, removed on release. */
  async openSnapshot(volume: string, snapshot: string): Promise<SnapshotReader> {
    const s = this.needSnap(volume, snapshot);
    const dir = await mkdtemp(join(tmpdir(), "thinvol-fake-snap-"));
    const path = join(dir, "image");
    await writeFile(path, s.data);
    await truncate(path, s.size);
    const key = `${volume}@${snapshot}`;
    this.readers.set(key, (this.readers.get(key) ?? 0) + 1);
    return {
      path,
      release: async () => {
        this.readers.set(key, (this.readers.get(key) ?? 1) - 1);
        await rm(dir, { recursive: true, force: true });
      },
    };
  }
  /** Where the data string lies; against `since`, that range when the two differ. */
  async changedRanges(volume: string, snapshot: string, since?: string): Promise<VolumeRange[]> {
    const s = this.needSnap(volume, snapshot);
    const length = Buffer.byteLength(s.data);
    if (since === undefined) return length > 0 ? [{ offset: 0, length }] : [];
    const before = this.needSnap(volume, since);
    const span = Math.max(length, Buffer.byteLength(before.data));
    return before.data === s.data || span === 0 ? [] : [{ offset: 0, length: span }];
  }
}
