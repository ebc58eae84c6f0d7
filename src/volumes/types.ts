import type { PoolUsage } from "../pool/types.js";

export interface VolumeInfo {
  name: string;
  /** Present only while the volume is mounted. */
  mountpoint?: string;
  /** RFC 3339. */
  createdAt: string;
  status: Record<string, string | number>;
}

export type VolumeSummary = Omit<VolumeInfo, "status">;

/** What the Docker protocol layer needs from the volume layer, and nothing more. */
export interface VolumeService {
  create(name: string, options: Readonly<Record<string, string>> | null): Promise<void>;
  remove(name: string): Promise<void>;
  mount(name: string, id: string): Promise<string>;
  unmount(name: string, id: string): Promise<void>;
  path(name: string): Promise<string | undefined>;
  get(name: string): Promise<VolumeInfo>;
  list(): Promise<VolumeSummary[]>;
}

/** Reports what a long operation is doing, for a person watching (the admin API streams it). */
export type Progress = (message: string) => void;

/** A volume as the admin API shows it: everything `thinvol ls` needs. */
export interface VolumeDetail {
  name: string;
  createdAt: string;
  sizeBytes: number;
  filesystem: string;
  mounted: boolean;
  mountpoint?: string;
  /** References held by containers. */
  mounts: number;
  /** Inside the filesystem, only while it is mounted. */
  usedBytes?: number;
  availableBytes?: number;
  /** Blocks the pool holds for it. */
  allocatedBytes?: number;
  /** A volume name, or VOLUME@SNAPSHOT. */
  origin?: string;
  snapshots: string[];
}

export interface SnapshotDetail {
  volume: string;
  name: string;
  createdAt: string;
  sizeBytes: number;
  allocatedBytes?: number;
}

/** The pool's figures (see PoolUsage) with the threshold and the counts. */
export interface PoolDetail extends PoolUsage {
  minFreePercent: number;
  volumes: number;
  snapshots: number;
}

export interface ResizeResult {
  name: string;
  previousSizeBytes: number;
  sizeBytes: number;
}

/** What the admin API needs from the volume layer: the operations Docker's protocol cannot express. */
export interface AdminService {
  volumes(): Promise<VolumeDetail[]>;
  volume(name: string): Promise<VolumeDetail>;
  pool(): Promise<PoolDetail>;
  resize(name: string, sizeBytes: number, progress?: Progress): Promise<ResizeResult>;
  growPool(sizeBytes: number, progress?: Progress): Promise<PoolDetail>;
  snapshots(volume?: string): Promise<SnapshotDetail[]>;
  createSnapshot(volume: string, name: string, progress?: Progress): Promise<SnapshotDetail>;
  removeSnapshot(volume: string, name: string, progress?: Progress): Promise<void>;
  rollback(volume: string, snapshot: string, progress?: Progress): Promise<VolumeDetail>;
}

/** What the admin API needs for backups (see BackupService). */
export interface BackupAdmin {
  createBackup(volume: string, url: string, progress?: Progress): Promise<object>;
  backups(url: string, volume?: string): Promise<object[]>;
  /** Without a target, the backup is looked for at every target backups were made to. */
  removeBackup(url: string | undefined, id: string): Promise<object>;
  verifyBackup(url: string | undefined, id: string): Promise<object>;
  restore(url: string, id: string, volume: string, progress?: Progress): Promise<VolumeDetail>;
}
