/**
 * Agent keys: ed25519 (Node's crypto), named by did:key, stored in Custos key files
 * (`{"type":"custos-ed25519-key","did":"did:key:z6Mk…","seed":"<base64>"}`, mode 0600).
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify as edVerify, type KeyObject } from "node:crypto";
import { closeSync, fsyncSync, openSync, readFileSync, statSync, writeSync, constants } from "node:fs";
import { CustosError } from "./errors.js";

const ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");
export const KEY_TYPE = "custos-ed25519-key";

export function base58Encode(data: Uint8Array): string {
  let zeros = 0;
  while (zeros < data.length && data[zeros] === 0) zeros++;
  let number = BigInt("0x" + (Buffer.from(data).toString("hex") || "0"));
  let out = "";
  while (number > 0n) {
    out = ALPHABET[Number(number % 58n)] + out;
    number /= 58n;
  }
  return "1".repeat(zeros) + out;
}

export function base58Decode(text: string): Uint8Array {
  let number = 0n;
  for (const char of text) {
    const index = ALPHABET.indexOf(char);
    if (index < 0) throw new Error(`\`${char}\` is not a base58btc character`);
    number = number * 58n + BigInt(index);
  }
  let zeros = 0;
  while (zeros < text.length && text[zeros] === "1") zeros++;
  let hex = number === 0n ? "" : number.toString(16);
  if (hex.length % 2) hex = "0" + hex;
  return Uint8Array.from([...new Array(zeros).fill(0), ...Buffer.from(hex, "hex")]);
}

/** `did:key:z…` of a 32-byte ed25519 public key. */
export function didFromPublicKey(publicKey: Uint8Array): string {
  if (publicKey.length !== 32) throw new CustosError("bad_keyid", `an ed25519 public key has 32 bytes, not ${publicKey.length}`);
  return "did:key:z" + base58Encode(Uint8Array.from([0xed, 0x01, ...publicKey]));
}

/** The 32-byte ed25519 public key a `did:key` names. */
export function publicKeyFromDid(did: string): Uint8Array {
  if (!did.startsWith("did:key:z")) throw new CustosError("bad_keyid", `\`${did}\` is not a base58btc did:key (did:key:z…)`);
  let raw: Uint8Array;
  try {
    raw = base58Decode(did.slice("did:key:z".length));
  } catch (error) {
    throw new CustosError("bad_keyid", `\`${did}\`: ${(error as Error).message}`);
  }
  if (raw.length !== 34 || raw[0] !== 0xed || raw[1] !== 0x01) {
    throw new CustosError("bad_keyid", `\`${did}\` does not name an ed25519 key (multicodec 0xed01, 32 bytes)`);
  }
  return raw.slice(2);
}

function publicKeyObject(publicKey: Uint8Array): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, publicKey]), format: "der", type: "spki" });
}

/** Whether `signature` is `did`'s ed25519 signature over `message`. */
export function verify(did: string, message: Uint8Array, signature: Uint8Array): boolean {
  try {
    return edVerify(null, message, publicKeyObject(publicKeyFromDid(did)), signature);
  } catch {
    return false;
  }
}

/** An agent's ed25519 key. Its identity is `did`. */
export class AgentKey {
  readonly publicKey: Uint8Array;
  readonly did: string;
  private readonly key: KeyObject;

  private constructor(readonly seed: Uint8Array) {
    this.key = createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: "der", type: "pkcs8" });
    const spki = createPublicKey(this.key).export({ format: "der", type: "spki" });
    this.publicKey = Uint8Array.from(spki.subarray(spki.length - 32));
    this.did = didFromPublicKey(this.publicKey);
  }

  static generate(): AgentKey {
    const { privateKey } = generateKeyPairSync("ed25519");
    const pkcs8 = privateKey.export({ format: "der", type: "pkcs8" });
    return new AgentKey(Uint8Array.from(pkcs8.subarray(pkcs8.length - 32)));
  }

  static fromSeed(seed: Uint8Array): AgentKey {
    if (seed.length !== 32) throw new CustosError("bad_key", `an ed25519 seed has 32 bytes, not ${seed.length}`);
    return new AgentKey(Uint8Array.from(seed));
  }

  sign(message: Uint8Array): Uint8Array {
    return Uint8Array.from(sign(null, message, this.key));
  }

  /** Reads a key file, refusing one that group or others can read. */
  static load(path: string): AgentKey {
    const mode = statSync(path).mode & 0o777;
    if (process.platform !== "win32" && mode & 0o077) {
      throw new CustosError("key_permissions", `key file \`${path}\` is readable by others (mode ${mode.toString(8)}); run \`chmod 600 ${path}\``);
    }
    let data: Record<string, unknown>;
    try {
      data = JSON.parse(readFileSync(path, "utf8"));
    } catch (error) {
      throw new CustosError("bad_key", `key file \`${path}\` is not JSON: ${(error as Error).message}`);
    }
    const keys = Object.keys(data ?? {}).sort().join(",");
    if (data?.type !== KEY_TYPE || keys !== "did,seed,type" || typeof data.seed !== "string") {
      throw new CustosError("bad_key", `key file \`${path}\` is not a Custos key (${KEY_TYPE})`);
    }
    const key = AgentKey.fromSeed(Buffer.from(data.seed, "base64"));
    if (key.did !== data.did) throw new CustosError("bad_key", `key file \`${path}\`: its seed is ${key.did}, not ${data.did}`);
    return key;
  }

  /** Writes a new owner-only key file; never overwrites one. */
  save(path: string): void {
    const text = JSON.stringify({ type: KEY_TYPE, did: this.did, seed: Buffer.from(this.seed).toString("base64") }, null, 2) + "\n";
    let fd: number;
    try {
      fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "EEXIST") {
        throw new CustosError("key_exists", `key file \`${path}\` already exists; refusing to overwrite a key`);
      }
      throw error;
    }
    try {
      writeSync(fd, text);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }
}
