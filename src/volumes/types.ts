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
