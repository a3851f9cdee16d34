// The state document of /api/state and /api/events (controller/src/dashboard/mod.rs).

export interface Meta {
  name: string;
  namespace?: string;
  creationTimestamp?: string;
}

export interface Condition {
  type: string;
  status: string;
  reason?: string;
  message?: string;
}

export interface Vm {
  metadata: Meta;
  spec: { cpus: number; memory: string; running?: boolean };
  status?: {
    phase?: string;
    nodeName?: string;
    cpus?: number;
    memory?: string;
    message?: string;
    conditions?: Condition[];
    interfaces?: { name?: string; ipAddress?: string; ipAddresses?: string[] }[];
  };
  live?: {
    guestCpus: number;
    guestMemoryBytes: number;
    agentConnected: boolean;
    migration?: { phase: string; targetNode: string; transferredBytes: number; totalBytes: number; percent: number };
  } | null;
}

export interface Operation {
  metadata: Meta;
  spec: { vmRef: { name: string }; operation: string; migrateSpec?: { targetNode?: string } };
  status?: { phase?: string; message?: string; progress?: { percent: number; stage?: string }; startTime?: string };
}

export interface Snapshot {
  metadata: Meta;
  spec: { vmRef: { name: string }; includeMemory?: boolean; description?: string };
  status?: { phase?: string; message?: string; sizeBytes?: number; creationTime?: string };
}

export interface Template {
  metadata: Meta;
  spec: { displayName?: string; osType?: string; image?: { source?: string }; defaultSpec?: { cpus?: number; memory?: string } };
  status?: { phase?: string; ready?: boolean; usageCount?: number; message?: string };
}

export interface KubeEvent {
  time: string;
  type?: string;
  reason?: string;
  note?: string;
  kind?: string;
  name?: string;
}

export interface NodeInfo {
  name: string;
  reachable: boolean;
  kvm: boolean;
  cpus: number;
  memoryBytes: number;
  allocatedCpus: number;
  allocatedMemoryBytes: number;
  carbonIntensity?: number | null;
}

export interface State {
  vms: Vm[];
  operations: Operation[];
  snapshots: Snapshot[];
  templates: Template[];
  events: KubeEvent[];
  nodes: NodeInfo[];
  access: { actions: boolean };
}
