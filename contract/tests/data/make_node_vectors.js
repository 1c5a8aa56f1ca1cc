// Generates node_vectors.json: tokens encrypted by Node's own `crypto` module exactly as the
// Repobox web app does (aes-256-gcm, 12-byte IV, `base64(iv):base64(tag):base64(ciphertext)`),
// with the key written in each of the three accepted forms.
// Run: node contract/tests/data/make_node_vectors.js > contract/tests/data/node_vectors.json
'use strict';
const crypto = require('crypto');

function encrypt(key, text) {
  const iv = crypto.randomBytes(12);
  const cipher = crypto.createCipheriv('aes-256-gcm', key, iv);
  const ct = Buffer.concat([cipher.update(text, 'utf8'), cipher.final()]);
  const tag = cipher.getAuthTag();
  return `${iv.toString('base64')}:${tag.toString('base64')}:${ct.toString('base64')}`;
}

const raw = 'repobox-test-key-32-chars-long!!';
if (Buffer.byteLength(raw) !== 32) throw new Error('raw key must be 32 bytes');
const keyBytes = crypto.randomBytes(32);
const keys = [
  { format: 'hex', key: keyBytes.toString('hex'), bytes: keyBytes },
  { format: 'base64', key: keyBytes.toString('base64'), bytes: keyBytes },
  { format: 'raw', key: raw, bytes: Buffer.from(raw, 'utf8') },
];
const tokens = ['ghp_1234567890abcdefghij', 'glpat-AbCdEfGhIjKlMnOpQrSt', 'tök€n with ünïcode', 'x'];
const vectors = [];
for (const k of keys) {
  for (const t of tokens) {
    vectors.push({ keyFormat: k.format, key: k.key, token: t, encrypted: encrypt(k.bytes, t) });
  }
}
process.stdout.write(JSON.stringify({ generator: `node ${process.version} crypto.createCipheriv('aes-256-gcm')`, vectors }, null, 2) + '\n');
