import { closeSync, openSync, readSync, realpathSync, statSync, truncateSync, writeFileSync, writeSync } from "node:fs";
import type { HostSpace } from "../../src/pool/host-space.js";
import type { BlockDevices } from "../../src/system/blockdev.js";
import { FakeRunner, commandFailure, type FakeReply } from "./fake-runner.js";

/*
 * A simulated kernel for the dm-thin driver: loop devices over real files,
 * device-mapper devices with live and inactive tables, /dev/mapper nodes, and
 * thin-pool metadata (thin ids with block mappings, the transaction id) that
 * lives "on disk" by metadata file, so it survives a reboot() while devices do
 * not. It answers the command lines the driver runs, with the errors the real
 * tools print, so tests can assert outcomes: which thin ids exist, what the
 * pool's transaction id is, whether anything was left suspended.
 *
 * The host filesystem under the pool files is simulated too: `fallocate` reserves space
 * in it (the real files stay sparse, so tests cost no disk), `hostSpace` is what the
 * driver reads of it, and a test can fill it from outside or give it more room.
 *
 * Disks (addDisk) are block devices of their own, as POOL_DEVICE names them: a size, what
 * blkid finds on them, whether something (a mount) holds them. A real file stands at the
 * disk's path so paths resolve; its contents are never read.
 *
 * Crash injection: crashAt(n) makes the n-th command from now never return,
 * either before or after it takes effect, like a process killed at that point.
 */

const LOOP_MAJOR = 7;
const DISK_MAJOR = 8;
const DM_MAJOR = 253;
const MAX_THIN_ID = 2 ** 24 - 1;
const SUPERBLOCK_MAGIC = "FAKE-THIN-METADATA";

interface Loop {
  dev: string;
  minor: number;
  file: string;
  sizeBytes: number;
  directIo: boolean;
  holders: number;
  autoclear: boolean;
}

/** A simulated disk (POOL_DEVICE). */
interface Disk {
  dev: string;
  minor: number;
  sizeBytes: number;
  /** Its /dev/disk/by-id names (a serial or WWN); empty like a loop device's. */
  ids: string[];
  /** What `blkid -p -o export` prints for it; undefined: nothing found. */
  signature: Record<string, string> | undefined;
  /** Mounted or claimed outside the pool: the kernel refuses to open it exclusively. */
  busy: boolean;
  holders: number;
}

interface PoolTable {
  kind: "thin-pool";
  length: number;
  meta: Loop;
  data: Loop | Disk;
  blockSize: number;
  lowWater: number;
  features: string[];
  text: string;
}

interface ThinTable {
  kind: "thin";
  length: number;
  pool: DmDev;
  id: number;
  text: string;
}

/** Any other target (e.g. `linear`): a device thinvol must leave alone. */
interface OtherTable {
  kind: "other";
  length: number;
  text: string;
}

type Table = PoolTable | ThinTable | OtherTable;

interface DmDev {
  name: string;
  minor: number;
  live: Table | undefined;
  inactive: Table | undefined;
  suspended: boolean;
  openCount: number;
  /** Made with `dmsetup create --readonly`: the kernel refuses writes. */
  readOnly: boolean;
}

/** What the metadata device holds. */
export interface PoolMetadata {
  transactionId: number;
  /** thin id → (virtual block → data block) */
  thins: Map<number, Map<number, number>>;
  /** data block → how many thins map it */
  refs: Map<number, number>;
  nextDataBlock: number;
  /** The data device's length in blocks as the metadata records it: a pool table may not be shorter. */
  dataBlocks: number;
  /** thin_check's complaint, when the metadata is damaged. */
  damage: string | undefined;
  /** The frozen copy of the thins' mappings while a metadata snapshot is reserved (what thin_delta -m reads). */
  metadataSnap?: Map<number, Map<number, number>> | undefined;
}

class DmFailure extends Error {}

const fail = (stderr: string): FakeReply => commandFailure(stderr.endsWith("\n") ? stderr + "Command failed." : `${stderr}\nCommand failed.`);

export interface CrashOptions {
  /** "before": the command has no effect; "after": it takes effect but the caller never hears back. */
  when: "before" | "after";
}

export class FakeDmKernel {
  readonly runner: FakeRunner;
  readonly loops = new Map<string, Loop>();
  /** By the disk's path. */
  readonly disks = new Map<string, Disk>();
  /** How the driver finds a disk from POOL_DEVICE: only disks are block devices. */
  readonly blockDevices: BlockDevices = {
    identify: async (path) => {
      const resolved = realpathSync(path);
      const disk = this.disks.get(resolved);
      if (!disk) throw new Error(`${resolved} is not a block device`);
      return { path: resolved, number: `${DISK_MAJOR}:${disk.minor}`, ids: disk.ids };
    },
  };
  readonly devices = new Map<string, DmDev>();
  readonly nodes = new Set<string>();
  /** By real path of the metadata file: survives reboot(). */
  readonly metadata = new Map<string, PoolMetadata>();
  /** Whether the kernel has device-mapper at all, and whether dm-thin-pool is loaded. */
  deviceMapper = true;
  thinPoolLoaded = true;
  /** Whether dm-thin-pool exists as a module; the kernel loads it when a table first uses it. */
  thinPoolModuleExists = true;
  /** Whether the backing files' filesystem refuses O_DIRECT (tmpfs does). */
  directIoRefused = false;
  /** Whether `modprobe dm_thin_pool` works (in a container it usually cannot). */
  modprobeWorks = false;
  /** Every command run, as `command arg...` lines. */
  readonly log: string[] = [];
  /** The simulated host filesystem: its size, and bytes used by anything but allocated pool files. */
  hostSizeBytes = 2 ** 40;
  hostOtherBytes = 0;
  /** Allocated bytes of each file, by real path (a file is allocated from its start). */
  readonly allocated = new Map<string, number>();
  /** What the driver reads of the simulated host filesystem. */
  readonly hostSpace: HostSpace = {
    freeBytes: async () => this.hostFreeBytes(),
    totalBytes: async () => this.hostSizeBytes,
    allocatedBytes: async (file) => {
      try {
        return this.allocated.get(realpathSync(file)) ?? 0;
      } catch {
        return 0;
      }
    },
  };

  private nextDmMinor = 0;
  private failures: { match: (line: string) => boolean; stderr: string; times: number }[] = [];
  private crash: { hit: (line: string) => boolean; when: "before" | "after"; resolve: () => void } | undefined;
  private dead = false;

  constructor() {
    this.runner = new FakeRunner((command, args) => this.handle(command, args));
  }

  // ------------------------------------------------------------ test controls

  /** A disk at `path` (a real, empty file stands there), optionally holding what blkid would find. */
  addDisk(path: string, sizeBytes: number, signature?: Record<string, string>, ids: string[] = []): string {
    writeFileSync(path, "");
    const dev = realpathSync(path);
    this.disks.set(dev, { dev, minor: this.disks.size * 16, sizeBytes, signature, busy: false, holders: 0, ids });
    return dev;
  }

  disk(path: string): Disk {
    const d = this.disks.get(realpathSync(path));
    if (!d) throw new Error(`no disk ${path}`);
    return d;
  }

  hostFreeBytes(): number {
    let used = this.hostOtherBytes;
    for (const n of this.allocated.values()) used += n;
    return Math.max(0, this.hostSizeBytes - used);
  }

  /** Something outside the pool fills the host until `freeBytes` are left. */
  fillHostTo(freeBytes: number): void {
    this.hostOtherBytes += Math.max(0, this.hostFreeBytes() - freeBytes);
  }

  /** Makes the n-th command from now (1-based) never return. Resolves when that happens. */
  crashAt(n: number, options: CrashOptions): Promise<void> {
    let countdown = n;
    return this.crashWhen(() => --countdown === 0, options);
  }

  /** Makes the first command whose line matches never return. Resolves when that happens. */
  crashWhen(match: RegExp | ((line: string) => boolean), options: CrashOptions): Promise<void> {
    const hit = typeof match === "function" ? match : (l: string) => match.test(l);
    return new Promise((resolve) => {
      this.crash = { hit, when: options.when, resolve };
    });
  }

  /** A new process may run commands again (the old one stays hung). */
  revive(): void {
    this.dead = false;
    this.crash = undefined;
  }

  /** The n-th command from now (1-based) fails with `stderr` and has no effect. */
  failAt(n: number, stderr = "fake kernel: injected failure"): void {
    let countdown = n;
    this.failures.push({ match: () => --countdown === 0, stderr, times: 1 });
  }

  /** The next `times` commands whose line matches fail with `stderr` and have no effect. */
  failWhen(match: RegExp | ((line: string) => boolean), stderr: string, times = 1): void {
    const fn = typeof match === "function" ? match : (l: string) => match.test(l);
    this.failures.push({ match: fn, stderr, times });
  }

  /** All devices and loop devices vanish; metadata on disk stays. */
  reboot(): void {
    this.loops.clear();
    this.devices.clear();
    this.nodes.clear();
    for (const d of this.disks.values()) d.holders = 0;
  }

  damageMetadata(metaFile: string, complaint: string): void {
    this.meta(metaFile).damage = complaint;
  }

  meta(metaFile: string): PoolMetadata {
    const m = this.metadata.get(realpathSync(metaFile));
    if (!m) throw new Error(`no pool metadata in ${metaFile}`);
    return m;
  }

  thinIds(metaFile: string): number[] {
    return [...this.meta(metaFile).thins.keys()].sort((a, b) => a - b);
  }

  transactionId(metaFile: string): number {
    return this.meta(metaFile).transactionId;
  }

  suspendedDevices(): string[] {
    return [...this.devices.values()].filter((d) => d.suspended).map((d) => d.name);
  }

  device(name: string): DmDev | undefined {
    return this.devices.get(name);
  }

  /** Simulates a mount or other holder of a device. */
  hold(name: string): void {
    this.mustDevice(name).openCount++;
  }

  release(name: string): void {
    this.mustDevice(name).openCount--;
  }

  /** Writes through a thin device: maps (or copies-on-write) the blocks covering the range. */
  write(name: string, offsetBytes: number, lengthBytes: number): void {
    const dev = this.mustDevice(name);
    const t = dev.live;
    if (t?.kind !== "thin") throw new Error(`${name} is not a thin device`);
    if (dev.suspended) throw new Error(`write to suspended ${name}`);
    if (dev.readOnly) throw new Error(`${name}: Operation not permitted (a read-only device)`);
    if (offsetBytes + lengthBytes > t.length * 512) throw new Error(`${name}: write beyond the end of the device (${t.length * 512} bytes)`);
    const pool = t.pool.live as PoolTable;
    const md = this.metaOf(pool);
    const map = md.thins.get(t.id);
    if (!map) throw new Error(`thin id ${t.id} missing`);
    const bytes = pool.blockSize * 512;
    const total = Math.floor(pool.length / pool.blockSize);
    for (let b = Math.floor(offsetBytes / bytes); b * bytes < offsetBytes + lengthBytes; b++) {
      const old = map.get(b);
      if (old !== undefined && md.refs.get(old) === 1) continue;
      if (this.usedDataBlocks(md) >= total) throw new Error(`${name}: No space left on device (error_if_no_space)`);
      if (old !== undefined) this.unref(md, old);
      const fresh = md.nextDataBlock++;
      md.refs.set(fresh, 1);
      map.set(b, fresh);
    }
  }

  /** The data blocks a thin device maps, in virtual-block order (equal lists = same data). */
  mappedDataBlocks(metaFile: string, id: number): number[] {
    const map = this.meta(metaFile).thins.get(id);
    return map ? [...map.entries()].sort(([a], [b]) => a - b).map(([, p]) => p) : [];
  }

  // ------------------------------------------------------------ internals

  private mustDevice(name: string): DmDev {
    const d = this.devices.get(name);
    if (!d) throw new Error(`no device ${name}`);
    return d;
  }

  private metaOf(pool: PoolTable): PoolMetadata {
    const m = this.metadata.get(realpathSync(pool.meta.file));
    if (!m) throw new Error("pool without metadata");
    return m;
  }

  private usedDataBlocks(md: PoolMetadata): number {
    return md.refs.size;
  }

  private unref(md: PoolMetadata, block: number): void {
    const n = (md.refs.get(block) ?? 0) - 1;
    if (n <= 0) md.refs.delete(block);
    else md.refs.set(block, n);
  }

  private async handle(command: string, args: readonly string[]): Promise<FakeReply> {
    const line = [command, ...args].join(" ");
    this.log.push(line);
    if (this.dead) return new Promise<FakeReply>(() => {});
    let crashNow: "before" | "after" | undefined;
    if (this.crash?.hit(line)) {
      crashNow = this.crash.when;
      this.dead = true;
      this.crash.resolve();
    }
    if (crashNow === "before") return new Promise<FakeReply>(() => {});
    let reply: FakeReply;
    const f = this.failures.find((x) => x.times > 0 && x.match(line));
    if (f) {
      f.times--;
      reply = commandFailure(f.stderr);
    } else {
      try {
        reply = this.execute(command, args);
      } catch (err) {
        if (err instanceof DmFailure) reply = fail(err.message);
        else throw err;
      }
    }
    if (crashNow === "after") return new Promise<FakeReply>(() => {});
    return reply;
  }

  private execute(command: string, args: readonly string[]): FakeReply {
    switch (command) {
      case "losetup":
        return this.losetup(args);
      case "dmsetup":
        return this.dmsetup(args);
      case "blkdiscard":
        return this.blkdiscard(args);
      case "thin_check":
        return this.thinCheck(args);
      case "thin_delta":
        return this.thinDelta(args);
      case "fallocate":
        return this.fallocate(args);
      case "blockdev":
        return this.blockdev(args);
      case "blkid":
        return this.blkid(args);
      case "modprobe":
        if (this.modprobeWorks && this.thinPoolModuleExists && args[0] === "dm_thin_pool") {
          this.thinPoolLoaded = true;
          return "";
        }
        return commandFailure("modprobe: FATAL: Module dm_thin_pool not found in directory /lib/modules/6.1.0", 1);
      default:
        return new Error(`fake kernel: unexpected command ${command} ${args.join(" ")}`);
    }
  }

  // ------------------------------------------------------------ losetup

  private loopByDev(dev: string): Loop | undefined {
    const m = /^(?:\/dev\/loop(\d+)|7:(\d+))$/.exec(dev);
    if (!m) return undefined;
    return this.loops.get(`/dev/loop${m[1] ?? m[2]}`);
  }

  private losetup(args: readonly string[]): FakeReply {
    const a = [...args];
    if (a[0] === "--find" && a[1] === "--show") {
      const file = a[a.length - 1] ?? "";
      if (this.directIoRefused && a.includes("--direct-io=on")) {
        return commandFailure(`losetup: ${file}: failed to set up loop device: Invalid argument`);
      }
      let minor = 0;
      while (this.loops.has(`/dev/loop${minor}`)) minor++;
      const dev = `/dev/loop${minor}`;
      let size: number;
      try {
        size = statSync(file).size;
      } catch {
        return commandFailure(`losetup: ${file}: failed to set up loop device: No such file or directory`);
      }
      this.loops.set(dev, { dev, minor, file: realpathSync(file), sizeBytes: size, directIo: a.includes("--direct-io=on"), holders: 0, autoclear: false });
      return `${dev}`;
    }
    if (a[0] === "--list" && a.includes("--associated")) {
      const file = realpathSync(a[a.length - 1] ?? "");
      return [...this.loops.values()].filter((l) => l.file === file).map((l) => l.dev).join("\n");
    }
    if (a[0] === "--list" && a[3] === "MAJ:MIN") {
      const loop = this.loopByDev(a[4] ?? "");
      if (!loop) return commandFailure(`losetup: ${a[4]}: failed to use device: No such device`);
      return `${LOOP_MAJOR}:${loop.minor}`;
    }
    if (a[0] === "--set-capacity") {
      const loop = this.loopByDev(a[1] ?? "");
      if (!loop) return commandFailure(`losetup: ${a[1]}: failed to use device: No such device`);
      loop.sizeBytes = statSync(loop.file).size;
      return "";
    }
    if (a[0] === "--detach") {
      const loop = this.loopByDev(a[1] ?? "");
      if (!loop) return commandFailure(`losetup: ${a[1]}: detach failed: No such device or address`);
      if (loop.holders > 0) loop.autoclear = true;
      else this.loops.delete(loop.dev);
      return "";
    }
    return new Error(`fake kernel: unexpected losetup ${args.join(" ")}`);
  }

  private dataByDev(dev: string): Loop | Disk | undefined {
    const disk = [...this.disks.values()].find((d) => d.dev === dev || `${DISK_MAJOR}:${d.minor}` === dev);
    return disk ?? this.loopByDev(dev);
  }

  private releaseLoop(loop: Loop | Disk): void {
    if (!("file" in loop)) {
      loop.holders--;
      return;
    }
    loop.holders--;
    if (loop.holders <= 0 && loop.autoclear) this.loops.delete(loop.dev);
  }

  // ------------------------------------------------------------ dmsetup

  private dmsetup(args: readonly string[]): FakeReply {
    if (!this.deviceMapper) {
      return commandFailure(
        "/dev/mapper/control: open failed: No such device\nFailure to communicate with kernel device-mapper driver.\nCommand failed.",
      );
    }
    const pos: string[] = [];
    let table: string | undefined;
    for (let i = 0; i < args.length; i++) {
      const a = args[i] ?? "";
      if (a === "--table") table = args[++i];
      else if (a === "-o" || a === "--separator") i++;
      else if (a.startsWith("-")) continue;
      else pos.push(a);
    }
    const [sub, name = "", ...rest] = pos;
    switch (sub) {
      case "version":
        return "Library version:   1.02.185 (2022-05-18)\nDriver version:    4.48.0";
      case "targets":
        return [
          ...(this.thinPoolLoaded ? ["thin-pool        v1.23.0", "thin             v1.23.0"] : []),
          "striped          v1.6.0",
          "linear           v1.4.0",
          "error            v1.6.0",
        ].join("\n");
      case "info": {
        if (this.devices.size === 0) return "No devices found";
        return [...this.devices.values()]
          .map((d) => [d.name, DM_MAJOR, d.minor, d.suspended ? "Suspended" : "Active", d.openCount].join("\t"))
          .join("\n");
      }
      case "create": {
        if (this.devices.has(name)) throw new DmFailure(`device-mapper: create ioctl on ${name}  failed: Device or resource busy`);
        if (table === undefined) return new Error("fake kernel: create without --table");
        const dev: DmDev = { name, minor: this.nextDmMinor++, live: undefined, inactive: undefined, suspended: false, openCount: 0, readOnly: args.includes("--readonly") };
        const t = this.parseTable(name, table, undefined);
        this.activate(dev, t);
        this.devices.set(name, dev);
        return "";
      }
      case "load": {
        const dev = this.devices.get(name);
        if (!dev) throw new DmFailure(`device-mapper: reload ioctl on ${name}  failed: No such device or address`);
        if (table === undefined) return new Error("fake kernel: load without --table");
        dev.inactive = this.parseTable(name, table, dev);
        return "";
      }
      case "suspend": {
        const dev = this.devices.get(name);
        if (!dev) throw new DmFailure(`device-mapper: suspend ioctl on ${name}  failed: No such device or address`);
        dev.suspended = true;
        return "";
      }
      case "resume": {
        const dev = this.devices.get(name);
        if (!dev) throw new DmFailure(`device-mapper: resume ioctl on ${name}  failed: No such device or address`);
        if (dev.inactive) {
          const next = dev.inactive;
          dev.inactive = undefined;
          const old = dev.live;
          if (old?.kind === "thin-pool" && next.kind === "thin-pool" && next.length < old.length) {
            throw new DmFailure(`device-mapper: resume ioctl on ${name}  failed: Invalid argument`);
          }
          if (old) this.deactivateTable(old);
          this.activate(dev, next);
        }
        dev.suspended = false;
        return "";
      }
      case "remove": {
        const dev = this.devices.get(name);
        if (!dev) throw new DmFailure(`device-mapper: remove ioctl on ${name}  failed: No such device or address`);
        if (dev.openCount > 0) throw new DmFailure(`device-mapper: remove ioctl on ${name}  failed: Device or resource busy`);
        if (dev.live) this.deactivateTable(dev.live);
        this.devices.delete(name);
        this.nodes.delete(`/dev/mapper/${name}`);
        return "";
      }
      case "mknodes": {
        const names = name ? [name] : [...this.devices.keys()];
        for (const n of names) {
          if (this.devices.has(n)) this.nodes.add(`/dev/mapper/${n}`);
          else this.nodes.delete(`/dev/mapper/${n}`);
        }
        return "";
      }
      case "table": {
        const dev = this.devices.get(name);
        if (!dev) throw new DmFailure("Device does not exist.");
        return dev.live?.text ?? "";
      }
      case "status":
        return this.status(name);
      case "message":
        return this.message(name, rest.slice(1).join(" "));
      default:
        return new Error(`fake kernel: unexpected dmsetup ${args.join(" ")}`);
    }
  }

  private activate(dev: DmDev, t: Table): void {
    if (t.kind === "thin-pool") {
      this.openMetadata(t);
      t.meta.holders++;
      t.data.holders++;
    } else if (t.kind === "thin") {
      t.pool.openCount++;
    }
    dev.live = t;
  }

  private deactivateTable(t: Table): void {
    if (t.kind === "thin-pool") {
      this.releaseLoop(t.meta);
      this.releaseLoop(t.data);
    } else if (t.kind === "thin") {
      t.pool.openCount--;
    }
  }

  /** The kernel formats blank metadata on first use and refuses damaged metadata. */
  private openMetadata(t: PoolTable): void {
    const key = realpathSync(t.meta.file);
    const fd = openSync(key, "r+");
    try {
      const buf = Buffer.alloc(4096);
      readSync(fd, buf, 0, 4096, 0);
      if (buf.every((b) => b === 0)) {
        writeSync(fd, Buffer.from(SUPERBLOCK_MAGIC), 0, SUPERBLOCK_MAGIC.length, 0);
        this.metadata.set(key, { transactionId: 0, thins: new Map(), refs: new Map(), nextDataBlock: 0, dataBlocks: 0, damage: undefined });
      }
    } finally {
      closeSync(fd);
    }
    const md = this.metadata.get(key);
    if (!md || md.damage) throw new DmFailure(`device-mapper: reload ioctl on pool  failed: Invalid argument`);
    // "pool target (N blocks) too small: expected M": a data device never shrinks.
    const blocks = Math.floor(t.length / t.blockSize);
    if (blocks < md.dataBlocks) throw new DmFailure(`device-mapper: reload ioctl on pool  failed: Invalid argument`);
    md.dataBlocks = blocks;
  }

  private parseTable(name: string, text: string, existing: DmDev | undefined): Table {
    const p = text.trim().split(/\s+/);
    const invalid = () => new DmFailure(`device-mapper: reload ioctl on ${name}  failed: Invalid argument`);
    if (p[0] !== "0" || !/^\d+$/.test(p[1] ?? "")) throw invalid();
    const length = Number(p[1]);
    if (p[2] === "thin-pool") {
      if (!this.thinPoolLoaded && !this.thinPoolModuleExists) throw invalid(); // "Unknown target type"
      this.thinPoolLoaded = true;
      const [, , , metaDev, dataDev, bs, low, count, ...features] = p;
      const meta = this.loopByDev(metaDev ?? "");
      const data = this.dataByDev(dataDev ?? "");
      const blockSize = Number(bs);
      if (!meta || !data || !Number.isInteger(blockSize) || blockSize < 128 || blockSize % 128 !== 0) throw invalid();
      if (Number(count) !== features.length) throw invalid();
      if (data.sizeBytes < length * 512) throw invalid(); // "device too small for target"
      // Opened exclusively: a mounted disk, or one another pool holds.
      if (!("file" in data) && (data.busy || (data.holders > 0 && !(existing?.live?.kind === "thin-pool" && existing.live.data === data)))) {
        throw new DmFailure(`device-mapper: reload ioctl on ${name}  failed: Device or resource busy`);
      }
      const dataMajor = "file" in data ? LOOP_MAJOR : DISK_MAJOR;
      if (existing?.live?.kind === "thin-pool" && existing.live.blockSize !== blockSize) throw invalid();
      const shown = [0, length, "thin-pool", `${LOOP_MAJOR}:${meta.minor}`, `${dataMajor}:${data.minor}`, blockSize, Number(low), features.length, ...features].join(" ");
      return { kind: "thin-pool", length, meta, data, blockSize, lowWater: Number(low), features, text: shown };
    }
    if (p[2] === "thin") {
      const [, , , poolDev, idText] = p;
      const pool = [...this.devices.values()].find(
        (d) => `${DM_MAJOR}:${d.minor}` === poolDev || (this.nodes.has(poolDev ?? "") && `/dev/mapper/${d.name}` === poolDev),
      );
      if (!pool || pool.live?.kind !== "thin-pool") throw invalid();
      const id = Number(idText);
      if (!this.metaOf(pool.live).thins.has(id)) throw invalid();
      return { kind: "thin", length, pool, id, text: [0, length, "thin", `${DM_MAJOR}:${pool.minor}`, id].join(" ") };
    }
    if (p[2] === "linear" && p.length === 5) return { kind: "other", length, text: p.join(" ") };
    throw invalid();
  }

  private status(name: string): FakeReply {
    const dev = this.devices.get(name);
    if (!dev) throw new DmFailure("Device does not exist.");
    const t = dev.live;
    if (!t) return "";
    if (t.kind === "thin-pool") {
      const md = this.metaOf(t);
      let mappings = 0;
      for (const m of md.thins.values()) mappings += m.size;
      const metaTotal = Math.floor(t.meta.sizeBytes / 4096);
      const metaUsed = 10 + md.thins.size + Math.ceil(mappings / 100);
      const dataTotal = Math.floor(t.length / t.blockSize);
      const dataUsed = this.usedDataBlocks(md);
      const mode = dataUsed >= dataTotal ? "out_of_data_space" : "rw";
      const discard = t.features.includes("no_discard_passdown") ? "no_discard_passdown" : "discard_passdown";
      const held = md.metadataSnap ? String(metaTotal - 1) : "-";
      return `0 ${t.length} thin-pool ${md.transactionId} ${metaUsed}/${metaTotal} ${dataUsed}/${dataTotal} ${held} ${mode} ${discard} error_if_no_space - ${Math.floor(metaTotal / 4)}`;
    }
    if (t.kind === "other") return `0 ${t.length} ${t.text.split(" ")[2]}`;
    const pool = t.pool.live as PoolTable;
    const map = this.metaOf(pool).thins.get(t.id) ?? new Map<number, number>();
    if (map.size === 0) return `0 ${t.length} thin 0 -`;
    const highest = (Math.max(...map.keys()) + 1) * pool.blockSize - 1;
    return `0 ${t.length} thin ${map.size * pool.blockSize} ${highest}`;
  }

  private message(name: string, text: string): FakeReply {
    const dev = this.devices.get(name);
    if (!dev) throw new DmFailure(`device-mapper: message ioctl on ${name}  failed: No such device or address`);
    const t = dev.live;
    const failed = (why: string) => new DmFailure(`device-mapper: message ioctl on ${name}  failed: ${why}`);
    if (t?.kind !== "thin-pool") throw failed("Invalid argument");
    const md = this.metaOf(t);
    const [verb, a, b] = text.trim().split(/\s+/);
    const num = (s: string | undefined) => {
      if (!/^\d+$/.test(s ?? "")) throw failed("Invalid argument");
      return Number(s);
    };
    const activeThinsOf = (id: number) =>
      [...this.devices.values()].filter((d) => d.live?.kind === "thin" && d.live.pool === dev && d.live.id === id);
    switch (verb) {
      case "create_thin": {
        const id = num(a);
        if (id > MAX_THIN_ID) throw failed("Invalid argument");
        if (md.thins.has(id)) throw failed("File exists");
        md.thins.set(id, new Map());
        return "";
      }
      case "create_snap": {
        const id = num(a);
        const origin = num(b);
        if (id > MAX_THIN_ID) throw failed("Invalid argument");
        if (md.thins.has(id)) throw failed("File exists");
        const from = md.thins.get(origin);
        if (!from) throw failed("No data available");
        // The real kernel does not check this; snapshotting a live origin corrupts it.
        if (activeThinsOf(origin).some((d) => !d.suspended)) throw new Error(`fake kernel: create_snap of origin ${origin} while it is active and not suspended`);
        md.thins.set(id, new Map(from));
        for (const p of from.values()) md.refs.set(p, (md.refs.get(p) ?? 0) + 1);
        return "";
      }
      case "delete": {
        const id = num(a);
        const map = md.thins.get(id);
        if (!map) throw failed("No data available");
        if (activeThinsOf(id).length > 0) throw failed("Device or resource busy");
        for (const p of map.values()) this.unref(md, p);
        md.thins.delete(id);
        return "";
      }
      case "reserve_metadata_snap": {
        if (md.metadataSnap) throw failed("Device or resource busy");
        md.metadataSnap = new Map([...md.thins].map(([id, map]) => [id, new Map(map)]));
        return "";
      }
      case "release_metadata_snap": {
        if (!md.metadataSnap) throw failed("Invalid argument");
        md.metadataSnap = undefined;
        return "";
      }
      case "set_transaction_id": {
        const from = num(a);
        const to = num(b);
        if (from !== md.transactionId) throw failed("Invalid argument");
        md.transactionId = to;
        return "";
      }
      default:
        throw failed("Invalid argument");
    }
  }

  private blkdiscard(args: readonly string[]): FakeReply {
    const path = args[args.length - 1] ?? "";
    if (!this.nodes.has(path)) return commandFailure(`blkdiscard: cannot open ${path}: No such file or directory`);
    const dev = this.devices.get(path.replace("/dev/mapper/", ""));
    if (!dev || dev.live?.kind !== "thin") return commandFailure(`blkdiscard: cannot open ${path}: No such device or address`);
    if (dev.openCount > 0) return commandFailure(`blkdiscard: cannot open ${path}: Device or resource busy`);
    const pool = dev.live.pool.live as PoolTable;
    const md = this.metaOf(pool);
    const map = md.thins.get(dev.live.id);
    if (map) {
      for (const p of map.values()) this.unref(md, p);
      map.clear();
    }
    return "";
  }

  /** `blockdev --getsize64 <disk>`; loop devices and thin devices are not asked. */
  private blockdev(args: readonly string[]): FakeReply {
    const disk = args[0] === "--getsize64" ? this.disks.get(args[1] ?? "") : undefined;
    if (!disk) return commandFailure(`blockdev: cannot open ${args[1] ?? ""}: No such file or directory`);
    return String(disk.sizeBytes);
  }

  /** `blkid -p -o export <disk>`: exit status 2 when it finds nothing. */
  private blkid(args: readonly string[]): FakeReply {
    if (args.join(" ") !== `-p -o export ${args[3] ?? ""}`) return new Error(`fake kernel: unexpected blkid ${args.join(" ")}`);
    const disk = this.disks.get(args[3] ?? "");
    if (!disk) return commandFailure(`blkid: error: ${args[3] ?? ""}: No such file or directory`, 2);
    if (!disk.signature) return commandFailure("", 2);
    return [`DEVNAME=${disk.dev}`, ...Object.entries(disk.signature).map(([k, v]) => `${k}=${v}`)].join("\n");
  }

  /** `fallocate --offset 0 --length N file`: allocates [0, N) on the host, growing the file; all or nothing. */
  private fallocate(args: readonly string[]): FakeReply {
    if (args[0] !== "--offset" || args[1] !== "0") return new Error(`fake kernel: unexpected fallocate ${args.join(" ")}`);
    const [flag, lengthText, file] = args.slice(2);
    if (flag !== "--length" || !/^\d+$/.test(lengthText ?? "") || file === undefined) return new Error(`fake kernel: unexpected fallocate ${args.join(" ")}`);
    const length = Number(lengthText);
    let key: string;
    try {
      key = realpathSync(file);
    } catch {
      return commandFailure(`fallocate: cannot open ${file}: No such file or directory`);
    }
    const have = this.allocated.get(key) ?? 0;
    if (length - have > this.hostFreeBytes()) return commandFailure("fallocate: fallocate failed: No space left on device");
    this.allocated.set(key, Math.max(have, length));
    if (statSync(key).size < length) truncateSync(key, length);
    return "";
  }

  /**
   * `thin_delta --metadata-snap --snap1 A --snap2 B <meta loop>`: the runs of the two thins'
   * virtual blocks, from the reserved metadata snapshot, in the tool's XML (adjacent blocks
   * of one kind in one run, unmapped blocks in none).
   */
  private thinDelta(args: readonly string[]): FakeReply {
    const a = [...args];
    const value = (flag: string) => {
      const i = a.indexOf(flag);
      return i >= 0 && /^\d+$/.test(a[i + 1] ?? "") ? Number(a[i + 1]) : undefined;
    };
    const left = value("--snap1");
    const right = value("--snap2");
    const loop = this.loopByDev(a.at(-1) ?? "");
    if (!a.includes("--metadata-snap") || left === undefined || right === undefined || !loop) return new Error(`fake kernel: unexpected thin_delta ${args.join(" ")}`);
    const md = this.metadata.get(loop.file);
    if (!md) return commandFailure("bad checksum in superblock");
    if (!md.metadataSnap) return commandFailure("no current metadata snap\nUsage: thin_delta [options] <device or file>");
    const l = md.metadataSnap.get(left);
    const r = md.metadataSnap.get(right);
    if (!l || !r) return commandFailure(`Unable to find mapping tree for thin device ${l ? right : left}`);
    const pool = [...this.devices.values()].find((d) => d.live?.kind === "thin-pool" && d.live.meta === loop)?.live as PoolTable | undefined;
    const runs: { kind: string; begin: number; length: number }[] = [];
    for (const b of [...new Set([...l.keys(), ...r.keys()])].sort((x, y) => x - y)) {
      const lb = l.get(b);
      const rb = r.get(b);
      const kind = lb === undefined ? "right_only" : rb === undefined ? "left_only" : lb === rb ? "same" : "different";
      const last = runs.at(-1);
      if (last && last.kind === kind && last.begin + last.length === b) last.length++;
      else runs.push({ kind, begin: b, length: 1 });
    }
    return [
      `<superblock uuid="" time="1" transaction="${md.transactionId}" data_block_size="${pool?.blockSize ?? 128}" nr_data_blocks="0">`,
      `  <diff left="${left}" right="${right}">`,
      ...runs.map((x) => `    <${x.kind} begin="${x.begin}" length="${x.length}"/>`),
      "  </diff>",
      "</superblock>",
    ].join("\n");
  }

  private thinCheck(args: readonly string[]): FakeReply {
    const dev = args[args.length - 1] ?? "";
    const loop = this.loopByDev(dev);
    if (!loop) return commandFailure(`${dev}: No such file or directory`);
    if (loop.holders > 0) return commandFailure(`${dev}: Device or resource busy`);
    const md = this.metadata.get(loop.file);
    if (!md) return commandFailure("examining superblock\n  superblock is corrupt\n    bad checksum in superblock");
    if (md.damage) return commandFailure(md.damage);
    return "";
  }
}
