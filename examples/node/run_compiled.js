#!/usr/bin/env node
// Run an edgeexit compiled early-exit graph with onnxruntime-node.
//
//   node run_compiled.js PACKAGE_DIR_OR_MODEL.onnx INPUT [--batch-size N] [--json OUT.json]
//                        [--thresholds T0,T1,...]
//
// PACKAGE_DIR: an exit package with a compiled graph (`edgeexit compile PKG` adds one);
//   the input name and shape, the graph file and the thresholds come from manifest.json.
// MODEL.onnx:  a compiled graph on its own, made with
//   `edgeexit compile PKG -o MODEL.onnx --bake-thresholds` (thresholds baked in), or without
//   --bake-thresholds, in which case pass --thresholds.
// INPUT: .npz (uncompressed, as numpy.savez writes it) holding a float32 array named after
//   the model input, shape (n, ...sample shape); or raw little-endian float32 (.f32/.bin),
//   n samples back to back in C order.
//
// The graph decides the exits itself: one session.run per batch returns logits, exit_index
// (int64) and score (float64) per sample.  Prints one line per sample and a summary.
// Exit codes: 2 bad arguments or input file, 3 bad package or model, 4 onnxruntime failed.

'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');

const USAGE = 'usage: node run_compiled.js PACKAGE_DIR_OR_MODEL.onnx INPUT ' +
  '[--batch-size N] [--json OUT.json] [--thresholds T0,T1,...]';
const THRESHOLDS_INPUT = 'thresholds';
const OUTPUTS = ['logits', 'exit_index', 'score'];

class CliError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}
const badInput = (message) => new CliError(message, 2);
const badModel = (message) => new CliError(message, 3);

// --- arguments ------------------------------------------------------------------

function parseArgs(argv) {
  const args = { positional: [], batchSize: 256, json: null, thresholds: null };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      console.log(USAGE);
      process.exit(0);
    }
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    const value = () => {
      if (eq > 0) return arg.slice(eq + 1);
      if (i + 1 >= argv.length) throw badInput(`${name} needs a value`);
      return argv[++i];
    };
    if (name === '--batch-size') {
      const text = value();
      args.batchSize = Number(text);
      if (!Number.isInteger(args.batchSize) || args.batchSize < 1) {
        throw badInput(`--batch-size must be a positive integer, got ${JSON.stringify(text)}`);
      }
    } else if (name === '--json') {
      args.json = value();
    } else if (name === '--thresholds') {
      const text = value();
      args.thresholds = text.split(',').map((t) => Number(t.trim()));
      if (text.trim() === '' || args.thresholds.some((t) => Number.isNaN(t))) {
        throw badInput(`--thresholds must be comma-separated numbers, got ${JSON.stringify(text)}`);
      }
    } else if (arg.startsWith('-') && arg !== '-') {
      throw badInput(`unknown option ${arg} (run with --help for usage)`);
    } else {
      args.positional.push(arg);
    }
  }
  if (args.positional.length !== 2) throw badInput(USAGE);
  return args;
}

// --- the model: a package directory or a bare compiled .onnx -----------------------

// What to feed and what comes back: {file, inputName, sampleShape, thresholdsInput,
// thresholds (null for a baked graph), outputs {logits, exit_index, score}, numExits}.
function describePackage(dir, thresholdsOverride) {
  const manifestPath = path.join(dir, 'manifest.json');
  if (!fs.existsSync(manifestPath)) throw badModel(`${dir} is a directory without manifest.json, not an exit package`);
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(manifestPath, 'utf8'));
  } catch (err) {
    throw badModel(`${manifestPath} is not valid JSON: ${err.message}`);
  }
  const compiled = manifest.compiled;
  if (!compiled) {
    throw badModel(`${dir} has no compiled graph; add one with \`edgeexit compile ${dir}\``);
  }
  if (compiled.inputs.length !== 1) {
    throw badModel(`this example feeds one input; the compiled graph of ${dir} takes ${compiled.inputs.length} ` +
      `(${compiled.inputs.join(', ')})`);
  }
  const inputName = compiled.inputs[0];
  const spec = manifest.inputs.find((i) => i.name === inputName);
  if (!spec) throw badModel(`manifest.json: compiled input ${inputName} is not among the package inputs`);
  if (spec.dtype !== 'float32') throw badModel(`input ${inputName} is ${spec.dtype}; this example feeds float32 only`);
  const sampleShape = spec.shape.slice(1);
  if (!sampleShape.every((d) => Number.isInteger(d))) {
    throw badModel(`input ${inputName} has shape ${JSON.stringify(spec.shape)}; this example needs a fixed ` +
      'shape after the batch axis');
  }
  const exits = manifest.stages.filter((s) => s.exit);
  // One threshold per early exit, in order. A null threshold (format version 4) disables that
  // exit: feed one that no score passes (entropy exits below it, confidence and margin at or above).
  const stored = exits.slice(0, -1).map((s) => {
    if (s.exit.threshold !== null && s.exit.threshold !== undefined) return s.exit.threshold;
    return s.exit.policy === 'entropy' ? -Infinity : Infinity;
  });
  const file = path.join(dir, compiled.file);
  if (!fs.existsSync(file)) throw badModel(`${file} is missing (manifest.json names it as the compiled graph)`);
  return {
    file,
    inputName,
    sampleShape,
    thresholdsInput: compiled.thresholds,
    thresholds: checkThresholds(thresholdsOverride || stored, exits.length - 1, thresholdsOverride ? '--thresholds' : 'manifest.json'),
    outputs: compiled.outputs,
    numExits: exits.length,
  };
}

function checkThresholds(values, expected, where) {
  if (values.length !== expected) {
    throw badInput(`${where} gives ${values.length} threshold(s); the model has ${expected} early exit(s)`);
  }
  return values;
}

// A bare .onnx: the names are the compiler's fixed ones; the sample shape comes from the graph.
function describeGraph(file, session, thresholdsOverride) {
  const takesThresholds = session.inputNames.includes(THRESHOLDS_INPUT);
  const dataInputs = session.inputMetadata.filter((m) => m.name !== THRESHOLDS_INPUT);
  const missing = OUTPUTS.filter((o) => !session.outputNames.includes(o));
  if (missing.length || dataInputs.length !== 1) {
    throw badModel(`${file} is not a single-input edgeexit compiled graph (inputs ${session.inputNames.join(', ')}; ` +
      `outputs ${session.outputNames.join(', ')})`);
  }
  let thresholds = null;
  if (takesThresholds) {
    if (!thresholdsOverride) {
      throw badInput(`${file} takes its thresholds as an input: pass --thresholds T0,T1,... (or run the package ` +
        'directory, whose manifest holds them, or compile with --bake-thresholds)');
    }
    const meta = session.inputMetadata.find((m) => m.name === THRESHOLDS_INPUT);
    const expected = meta.shape.length === 1 && Number.isInteger(meta.shape[0]) ? meta.shape[0] : thresholdsOverride.length;
    thresholds = checkThresholds(thresholdsOverride, expected, '--thresholds');
  } else if (thresholdsOverride) {
    // A feed for a value that is not a graph input would be silently ignored by onnxruntime-node.
    throw badInput(`${file} has its thresholds baked in; --thresholds cannot change them (recompile without ` +
      '--bake-thresholds to set them at run time)');
  }
  const input = dataInputs[0];
  if (input.type !== 'float32') throw badModel(`input ${input.name} of ${file} is ${input.type}; this example feeds float32 only`);
  const sampleShape = input.shape.slice(1);
  if (!sampleShape.every((d) => Number.isInteger(d))) {
    throw badModel(`input ${input.name} of ${file} has shape ${JSON.stringify(input.shape)}; this example needs a ` +
      'fixed shape after the batch axis');
  }
  return {
    file,
    inputName: input.name,
    sampleShape,
    thresholdsInput: takesThresholds ? THRESHOLDS_INPUT : null,
    thresholds,
    outputs: Object.fromEntries(OUTPUTS.map((o) => [o, o])),
    numExits: thresholds ? thresholds.length + 1 : null,   // baked: not stated in the graph
  };
}

// --- input files --------------------------------------------------------------------

// The entries of an uncompressed zip (what numpy.savez writes): {name: Buffer}.
function readZip(buf, file) {
  const EOCD = 0x06054b50;
  let eocd = -1;
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 22 - 0xffff); i--) {
    if (buf.readUInt32LE(i) === EOCD) { eocd = i; break; }
  }
  if (eocd < 0) throw badInput(`${file} is not a zip archive (.npz)`);
  let count = buf.readUInt16LE(eocd + 10);
  let offset = buf.readUInt32LE(eocd + 16);
  const loc = eocd - 20;   // zip64 end-of-central-directory locator, when sizes overflow
  if ((count === 0xffff || offset === 0xffffffff) && loc >= 0 && buf.readUInt32LE(loc) === 0x07064b50) {
    const eocd64 = Number(buf.readBigUInt64LE(loc + 8));
    count = Number(buf.readBigUInt64LE(eocd64 + 32));
    offset = Number(buf.readBigUInt64LE(eocd64 + 48));
  }
  const entries = {};
  for (let k = 0; k < count; k++) {
    if (offset + 46 > buf.length || buf.readUInt32LE(offset) !== 0x02014b50) throw badInput(`${file}: damaged zip central directory`);
    const method = buf.readUInt16LE(offset + 10);
    let size = buf.readUInt32LE(offset + 20);
    const nameLen = buf.readUInt16LE(offset + 28);
    const extraLen = buf.readUInt16LE(offset + 30);
    const commentLen = buf.readUInt16LE(offset + 32);
    let local = buf.readUInt32LE(offset + 42);
    const name = buf.toString('utf8', offset + 46, offset + 46 + nameLen);
    // zip64 extra field: 8-byte sizes/offset replace the fields that read 0xffffffff, in this order
    let extra = offset + 46 + nameLen;
    const extraEnd = extra + extraLen;
    while (extra + 4 <= extraEnd) {
      const id = buf.readUInt16LE(extra);
      const len = buf.readUInt16LE(extra + 2);
      if (id === 0x0001) {
        let p = extra + 4;
        if (buf.readUInt32LE(offset + 24) === 0xffffffff) p += 8;   // uncompressed size
        if (size === 0xffffffff) { size = Number(buf.readBigUInt64LE(p)); p += 8; }
        if (local === 0xffffffff) local = Number(buf.readBigUInt64LE(p));
      }
      extra += 4 + len;
    }
    if (method !== 0) {
      throw badInput(`${file}: ${name} is compressed (zip method ${method}); this example reads uncompressed .npz ` +
        'only: save with numpy.savez, not numpy.savez_compressed');
    }
    if (buf.readUInt32LE(local) !== 0x04034b50) throw badInput(`${file}: damaged zip entry ${name}`);
    const start = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    if (start + size > buf.length) throw badInput(`${file}: zip entry ${name} runs past the end of the file`);
    entries[name] = buf.subarray(start, start + size);
    offset += 46 + nameLen + extraLen + commentLen;
  }
  return entries;
}

// A .npy array: float32, little-endian, C order only. Returns {data: Float32Array, shape}.
function readNpy(buf, what) {
  if (buf.length < 10 || buf.toString('latin1', 0, 6) !== '\x93NUMPY') throw badInput(`${what} is not a .npy array`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const headerStart = major === 1 ? 10 : 12;
  const header = buf.toString('latin1', headerStart, headerStart + headerLen);
  const descr = /'descr':\s*'([^']*)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeText) throw badInput(`${what}: cannot read the .npy header ${header.trim()}`);
  if (descr[1] !== '<f4') {
    throw badInput(`${what} has dtype ${descr[1]}; this example reads float32 little-endian ('<f4') only ` +
      '(convert with x.astype(np.float32))');
  }
  if (fortran[1] === 'True') throw badInput(`${what} is in Fortran order; save np.ascontiguousarray(x) instead`);
  const shape = shapeText[1].split(',').map((d) => d.trim()).filter((d) => d !== '').map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const start = headerStart + headerLen;
  if (buf.length - start !== count * 4) {
    throw badInput(`${what}: shape (${shape.join(', ')}) needs ${count * 4} bytes of data, the file holds ${buf.length - start}`);
  }
  return { data: toFloat32(buf, start, count), shape };
}

// Copy into a fresh, aligned Float32Array (a Buffer's offset need not be a multiple of 4).
function toFloat32(buf, start, count) {
  const bytes = buf.buffer.slice(buf.byteOffset + start, buf.byteOffset + start + count * 4);
  return new Float32Array(bytes);
}

function readInput(file, model) {
  if (os.endianness() !== 'LE') throw badInput('this example reads little-endian float32 on little-endian machines only');
  let buf;
  try {
    buf = fs.readFileSync(file);
  } catch (err) {
    throw badInput(`cannot read ${file}: ${err.code === 'ENOENT' ? 'no such file' : err.message}`);
  }
  const sampleSize = model.sampleShape.reduce((a, b) => a * b, 1);
  const want = `(n, ${model.sampleShape.join(', ')})`;
  const ext = path.extname(file).toLowerCase();
  let data;
  if (ext === '.npz') {
    const entries = readZip(buf, file);
    const entry = entries[`${model.inputName}.npy`];
    if (!entry) {
      const names = Object.keys(entries).map((n) => n.replace(/\.npy$/, ''));
      throw badInput(`${file} has no array named ${model.inputName} (the model input); it holds: ${names.join(', ') || 'nothing'}`);
    }
    const array = readNpy(entry, `${file}:${model.inputName}`);
    if (array.shape.length !== model.sampleShape.length + 1 ||
        array.shape.slice(1).some((d, k) => d !== model.sampleShape[k])) {
      throw badInput(`${file}:${model.inputName} has shape (${array.shape.join(', ')}); the model takes ${want}`);
    }
    data = array.data;
  } else if (ext === '.f32' || ext === '.bin') {
    if (buf.length % (4 * sampleSize) !== 0) {
      throw badInput(`${file} holds ${buf.length} bytes, not a whole number of float32 samples of shape ` +
        `(${model.sampleShape.join(', ')}) (${4 * sampleSize} bytes each)`);
    }
    data = toFloat32(buf, 0, buf.length / 4);
  } else {
    throw badInput(`${file}: unknown input type ${ext || '(no extension)'}; give a .npz, or raw float32 as .f32/.bin`);
  }
  if (data.length === 0) throw badInput(`${file} holds no samples`);
  return { data, n: data.length / sampleSize, sampleSize };
}

// --- running ------------------------------------------------------------------------

function argmax(logits, row, classes) {
  // numpy's rule: the first maximum; a NaN counts as the maximum.
  let best = 0;
  for (let c = 0; c < classes; c++) {
    const v = logits[row * classes + c];
    if (Number.isNaN(v)) return c;
    if (v > logits[row * classes + best]) best = c;
  }
  return best;
}

async function runAll(ort, session, model, input, batchSize) {
  const predictions = [];
  const exitIndex = [];
  const scores = [];
  const thresholdFeed = model.thresholdsInput
    ? new ort.Tensor('float64', Float64Array.from(model.thresholds), [model.thresholds.length])
    : null;
  for (let start = 0; start < input.n; start += batchSize) {
    const rows = Math.min(batchSize, input.n - start);
    const batch = input.data.slice(start * input.sampleSize, (start + rows) * input.sampleSize);
    const feeds = { [model.inputName]: new ort.Tensor('float32', batch, [rows, ...model.sampleShape]) };
    if (thresholdFeed) feeds[model.thresholdsInput] = thresholdFeed;
    let out;
    try {
      out = await session.run(feeds);
    } catch (err) {
      throw new CliError(`onnxruntime failed on samples ${start}..${start + rows - 1}: ${firstLine(err)}`, 4);
    }
    const logits = out[model.outputs.logits];
    const classes = logits.dims[1];
    const exits = out[model.outputs.exit_index].data;   // BigInt64Array
    const score = out[model.outputs.score].data;         // Float64Array
    for (let r = 0; r < rows; r++) {
      predictions.push(argmax(logits.data, r, classes));
      exitIndex.push(Number(exits[r]));
      scores.push(score[r]);
    }
  }
  return { predictions, exitIndex, scores };
}

function firstLine(err) {
  return String((err && err.message) || err).trim().split('\n')[0];
}

async function main(argv) {
  const args = parseArgs(argv);
  const [target, inputFile] = args.positional;
  let ort;
  try {
    ort = require('onnxruntime-node');
  } catch (err) {
    throw badModel(`cannot load onnxruntime-node (${firstLine(err)}); install it with ` +
      `\`cd ${path.relative(process.cwd(), __dirname) || '.'} && ONNXRUNTIME_NODE_INSTALL=skip npm ci\``);
  }
  if (!fs.existsSync(target)) throw badModel(`${target}: no such package directory or .onnx file`);
  const isPackage = fs.statSync(target).isDirectory();
  let model = isPackage ? describePackage(target, args.thresholds) : null;
  let session;
  try {
    session = await ort.InferenceSession.create(isPackage ? model.file : target);
  } catch (err) {
    throw new CliError(`onnxruntime cannot load ${isPackage ? model.file : target}: ${firstLine(err)}`, 4);
  }
  if (!isPackage) model = describeGraph(target, session, args.thresholds);
  for (const name of [model.inputName, ...(model.thresholdsInput ? [model.thresholdsInput] : [])]) {
    if (!session.inputNames.includes(name)) {
      throw badModel(`${model.file} has no input ${name} (it takes ${session.inputNames.join(', ')})`);
    }
  }
  const input = readInput(inputFile, model);
  const t0 = process.hrtime.bigint();
  const result = await runAll(ort, session, model, input, args.batchSize);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;

  const lines = ['index prediction exit_index score'];
  for (let i = 0; i < input.n; i++) {
    lines.push(`${i} ${result.predictions[i]} ${result.exitIndex[i]} ${result.scores[i]}`);
  }
  const numExits = model.numExits || Math.max(...result.exitIndex) + 1;
  const counts = new Array(numExits).fill(0);
  for (const e of result.exitIndex) counts[e] += 1;
  const shares = counts.map((c, e) => `exit ${e}: ${(100 * c / input.n).toFixed(1)}% (${c})`).join(', ');
  const thresholds = model.thresholds ? `thresholds [${model.thresholds.join(', ')}]` : 'thresholds baked in';
  lines.push(`${input.n} samples in batches of ${Math.min(args.batchSize, input.n)}, ${ms.toFixed(1)} ms ` +
    `(onnxruntime-node ${ort.env.versions.node}, ${thresholds}); exit shares: ${shares}`);
  process.stdout.write(lines.join('\n') + '\n');

  if (args.json) {
    const json = { predictions: result.predictions, exit_index: result.exitIndex, scores: result.scores };
    try {
      fs.writeFileSync(args.json, JSON.stringify(json) + '\n');
    } catch (err) {
      throw badInput(`cannot write ${args.json}: ${err.message}`);
    }
  }
}

main(process.argv.slice(2)).catch((err) => {
  const code = err instanceof CliError ? err.code : 1;
  process.stderr.write(`run_compiled.js: error: ${err instanceof CliError ? err.message : (err && err.stack) || err}\n`);
  process.exitCode = code;
});
