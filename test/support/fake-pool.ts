import type { CloneOptions, Pool, PoolUsage } from "../../src/pool/types.js";

/** An in-memory pool that behaves like a real one from the volume layer's side. */
export class FakePool implements Pool {
  readonly driver = "loop" as const;
  readonly volumes = new Map<string, { size: number; active: boolean; origin?: string }>();
  readonly clones: { name: string; origin: string; options: CloneOptions }[] = [];
  dataTotalBytes = 100 * 1024 ** 3;
  dataUsedBytes = 0;
  /** Set to make the next create or clone fail with this message. */
  failNext: string | undefined;

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
    this.volumes.set(name, { size: sizeBytes, active: false });
  }
  async clone(name: string, origin: string, options: CloneOptions = {}) {
    const o = this.volumes.get(origin);
    if (!o) throw new Error(`no origin "${origin}"`);
    if (this.volumes.has(name)) throw new Error(`"${name}" exists`);
    this.take();
    this.clones.push({ name, origin, options });
    this.volumes.set(name, { size: o.size, active: false, origin });
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
    return `/dev/fake/${name}`;
  }
  async deactivate(name: string) {
    const v = this.volumes.get(name);
    if (v) v.active = false;
  }
  async remove(name: string) {
    this.volumes.delete(name);
  }
  async usage(): Promise<PoolUsage> {
    return { driver: "loop", dataTotalBytes: this.dataTotalBytes, dataUsedBytes: this.dataUsedBytes };
  }
  async allocatedBytes() {
    return 0;
  }
  active(): string[] {
    return [...this.volumes].filter(([, v]) => v.active).map(([n]) => n);
  }
}
