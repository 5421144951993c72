'use strict';
// A judge upstream: Node + Express, standing in for an LLM API server written in Node, and
// recording what its model would read (tests/judges/__init__.py describes the protocol).
//
// Express as such a server uses it: `app.use(express.json())` with its defaults (type
// application/json, charset from the content-type, gzip/deflate/br inflated, 100kb, strict) and
// `app.post(path, ...)` on the default router (case-insensitive, a trailing slash accepted).
// Nothing is validated: a handler reads what it finds, any role included.
//
// "What the model reads" is every text the server would hand to the model, per message joined
// the way a chat template renders its parts (no separator), plus tool calls, reasoning, tool
// definitions, chat documents and, per API, the system prompt, document blocks, search results,
// instructions, prompt variables and the Completions suffix; the same reading as
// tests/judges/fastapi_judge.py.
//
// Run: node judge.js [--host H] [--port P]; prints "judge listening on HOST:PORT".

const express = require('express');

const CASE_HEADER = 'x-judge-case';
const ANSWER_HEADER = 'x-judge-answer';
const DEFAULT_ANSWER = 'All good here.';

const records = [];

const str = (value) => (typeof value === 'string' ? value : '');
const list = (value) => (Array.isArray(value) ? value : []);
const obj = (value) => (value !== null && typeof value === 'object' && !Array.isArray(value) ? value : {});

function functionTexts(name, description, schema) {
  const texts = [str(name), str(description)].filter((t) => t);
  if (schema !== undefined && schema !== null) texts.push(JSON.stringify(schema));
  return texts;
}

// -- OpenAI Chat Completions ------------------------------------------------------------------

function chatPartText(part) {
  if (typeof part === 'string') return part;
  const p = obj(part);
  if (p.type === undefined || p.type === null || ['text', 'input_text', 'output_text'].includes(p.type)) {
    return str(p.text);
  }
  if (p.type === 'thinking') return str(p.thinking);
  if (p.type === 'refusal') return str(p.refusal);
  return '';
}

function chatTexts(body) {
  const texts = [];
  for (const m of list(body.messages)) {
    const message = obj(m);
    if (typeof message.content === 'string') texts.push(message.content);
    else if (Array.isArray(message.content)) texts.push(message.content.map(chatPartText).join(''));
    for (const call of list(message.tool_calls)) {
      const fn = obj(obj(call).function);
      texts.push(...[str(fn.name), str(fn.arguments)].filter((t) => t));
    }
    texts.push(...[str(message.reasoning), str(message.reasoning_content)].filter((t) => t));
  }
  for (const tool of list(body.tools)) {
    const fn = obj(obj(tool).function);
    texts.push(...functionTexts(fn.name, fn.description, fn.parameters));
  }
  for (const document of list(body.documents)) texts.push(Object.values(obj(document)).map(str).join(''));
  return texts;
}

// -- Anthropic Messages -----------------------------------------------------------------------

function blocksText(content) {
  if (typeof content === 'string') return content;
  return list(content).map(blockText).join('');
}

function blockText(b) {
  const block = obj(b);
  switch (block.type) {
    case 'text': return str(block.text);
    case 'thinking': return str(block.thinking);
    case 'tool_use': return JSON.stringify(block.input === undefined ? null : block.input);
    case 'tool_result':
    case 'search_result':
    case 'document': {
      const parts = [str(block.title), str(block.context)];
      if (typeof block.source === 'string') parts.push(block.source);
      const source = obj(block.source);
      if (source.type === 'text') parts.push(str(source.data));
      else if (source.type === 'content') parts.push(blocksText(source.content));
      parts.push(blocksText(block.content));
      return parts.join('');
    }
    default: return '';
  }
}

function messagesTexts(body) {
  const texts = body.system === undefined || body.system === null ? [] : [blocksText(body.system)];
  for (const message of list(body.messages)) texts.push(blocksText(obj(message).content));
  for (const t of list(body.tools)) {
    const tool = obj(t);
    texts.push(...functionTexts(tool.name, tool.description, tool.input_schema));
  }
  return texts;
}

// -- OpenAI Responses -------------------------------------------------------------------------

function partsText(content) {
  if (typeof content === 'string') return content;
  return list(content).map((p) => str(obj(p).text) || str(obj(p).refusal)).join('');
}

function responsesTexts(body) {
  const texts = body.instructions ? [str(body.instructions)] : [];
  const variables = obj(obj(body.prompt).variables);
  for (const value of Object.values(variables)) {
    texts.push(typeof value === 'string' ? value : partsText([value]));
  }
  if (typeof body.input === 'string') texts.push(body.input);
  for (const i of list(body.input)) {
    const item = obj(i);
    if (item.type === undefined || item.type === null || item.type === 'message') {
      texts.push(partsText(item.content));
    } else if (['function_call', 'custom_tool_call'].includes(item.type)) {
      texts.push(...[str(item.name), str(item.arguments)].filter((t) => t));
    } else if (['function_call_output', 'custom_tool_call_output'].includes(item.type)) {
      texts.push(partsText(item.output));
    } else if (item.type === 'reasoning') {
      texts.push(partsText(item.summary) + partsText(item.content));
    }
  }
  for (const t of list(body.tools)) {
    const tool = obj(t);
    texts.push(...functionTexts(tool.name, tool.description, tool.parameters));
  }
  return texts;
}

// -- OpenAI legacy Completions ----------------------------------------------------------------

function completionsTexts(body) {
  const texts = typeof body.prompt === 'string' ? [body.prompt] : list(body.prompt).filter((p) => typeof p === 'string');
  if (body.suffix) texts.push(str(body.suffix));
  return texts;
}

// -- answers ----------------------------------------------------------------------------------

const pieces = (answer) => answer.match(/\S+\s*|\s+/g) || [''];

function sse(payload, event) {
  const head = event ? `event: ${event}\n` : '';
  return `${head}data: ${typeof payload === 'string' ? payload : JSON.stringify(payload)}\n\n`;
}

function chatAnswer(answer, stream) {
  const head = { id: 'chatcmpl-judge', created: 0, model: 'judge' };
  if (!stream) {
    return { ...head, object: 'chat.completion', choices: [
      { index: 0, message: { role: 'assistant', content: answer }, finish_reason: 'stop' }] };
  }
  const chunk = (delta, finish = null) => sse({ ...head, object: 'chat.completion.chunk', choices: [
    { index: 0, delta, logprobs: null, finish_reason: finish }] });
  return [chunk({ role: 'assistant', content: '' }), ...pieces(answer).map((p) => chunk({ content: p })),
    chunk({}, 'stop'), sse('[DONE]')];
}

function completionsAnswer(answer, stream) {
  const head = { id: 'cmpl-judge', object: 'text_completion', created: 0, model: 'judge' };
  if (!stream) {
    return { ...head, choices: [{ index: 0, text: answer, logprobs: null, finish_reason: 'stop' }] };
  }
  const chunk = (text, finish = null) => sse({ ...head, choices: [
    { index: 0, text, logprobs: null, finish_reason: finish }] });
  return [...pieces(answer).map((p) => chunk(p)), chunk('', 'stop'), sse('[DONE]')];
}

function messagesAnswer(answer, stream) {
  const message = { id: 'msg_judge', type: 'message', role: 'assistant', model: 'judge', content: [],
    stop_reason: null, stop_sequence: null, usage: { input_tokens: 1, output_tokens: 0 } };
  if (!stream) return { ...message, content: [{ type: 'text', text: answer }], stop_reason: 'end_turn' };
  return [
    sse({ type: 'message_start', message }, 'message_start'),
    sse({ type: 'content_block_start', index: 0, content_block: { type: 'text', text: '' } }, 'content_block_start'),
    ...pieces(answer).map((p) => sse({ type: 'content_block_delta', index: 0,
      delta: { type: 'text_delta', text: p } }, 'content_block_delta')),
    sse({ type: 'content_block_stop', index: 0 }, 'content_block_stop'),
    sse({ type: 'message_delta', delta: { stop_reason: 'end_turn', stop_sequence: null },
      usage: { output_tokens: pieces(answer).length } }, 'message_delta'),
    sse({ type: 'message_stop' }, 'message_stop'),
  ];
}

function responsesAnswer(answer, stream) {
  const part = { type: 'output_text', text: answer, annotations: [] };
  const item = { id: 'msg_judge', type: 'message', role: 'assistant', status: 'completed', content: [part] };
  const response = { id: 'resp_judge', object: 'response', created_at: 0, model: 'judge',
    status: 'completed', output: [item], error: null, incomplete_details: null };
  if (!stream) return response;
  let number = 0;
  const event = (type, payload) => sse({ type, ...payload, sequence_number: number++ }, type);
  const where = { item_id: 'msg_judge', output_index: 0, content_index: 0 };
  return [
    event('response.created', { response: { ...response, status: 'in_progress', output: [] } }),
    event('response.output_item.added', { output_index: 0, item: { ...item, status: 'in_progress', content: [] } }),
    event('response.content_part.added', { ...where, part: { ...part, text: '' } }),
    ...pieces(answer).map((p) => event('response.output_text.delta', { ...where, delta: p })),
    event('response.output_text.done', { ...where, text: answer }),
    event('response.content_part.done', { ...where, part }),
    event('response.output_item.done', { output_index: 0, item }),
    event('response.completed', { response }),
  ];
}

// -- routes -----------------------------------------------------------------------------------

function record(req, api, outcome, texts, detail = '') {
  records.push({
    case: req.get(CASE_HEADER) || '', api, outcome, method: req.method, path: req.path,
    raw_path: req.originalUrl, texts, detail: String(detail).slice(0, 500),
  });
}

function route(api, readTexts, buildAnswer) {
  return (req, res) => {
    const body = obj(req.body);
    record(req, api, 'read', readTexts(body));
    const built = buildAnswer(req.get(ANSWER_HEADER) || DEFAULT_ANSWER, body.stream === true);
    if (!Array.isArray(built)) {
      res.json(built);
      return;
    }
    res.status(200).set('content-type', 'text/event-stream');
    for (const event of built) res.write(event);
    res.end();
  };
}

const app = express();
app.get('/_records', (req, res) => {
  const wanted = typeof req.query.case === 'string' ? req.query.case : '';
  res.json(records.filter((r) => !wanted || r.case === wanted));
});
app.use(express.json());
app.post('/v1/chat/completions', route('chat', chatTexts, chatAnswer));
app.post('/v1/messages', route('messages', messagesTexts, messagesAnswer));
app.post('/v1/responses', route('responses', responsesTexts, responsesAnswer));
app.post('/v1/completions', route('completions', completionsTexts, completionsAnswer));
app.use((req, res) => {
  record(req, '', 'unrouted', [], '404');
  res.status(404).json({ error: { message: 'not found', type: 'not_found' } });
});
// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  record(req, '', 'invalid', [], `${err.status || 500} ${err.type || ''} ${err.message}`);
  res.status(err.status || 500).json({ error: { message: 'invalid request', type: 'invalid_request' } });
});

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const at = args.indexOf(name);
  return at >= 0 && at + 1 < args.length ? args[at + 1] : fallback;
};
const host = option('--host', '127.0.0.1');
const server = app.listen(Number(option('--port', '0')), host, (err) => {
  if (err) throw err;
  console.log(`judge listening on ${host}:${server.address().port}`);
});
