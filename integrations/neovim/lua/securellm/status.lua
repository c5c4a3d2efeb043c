-- `:SecureLLMStatus`: the stack at a glance in a floating window, from the gateway's management
-- API (`GET /admin/v1/status`, with the admin token): services, GPUs as bars, leases and who holds
-- them, the queue, the loaded models. `:SecureLLMModels`: pick the model from `/v1/models`.

local config = require('securellm.config')
local http = require('securellm.http')

local M = {}

local function mib(b)
  if not b then
    return '-'
  end
  if b >= 1024 * 1024 * 1024 then
    return string.format('%.1f GiB', b / (1024 * 1024 * 1024))
  end
  return string.format('%.0f MiB', b / (1024 * 1024))
end

local function bar(g, width)
  local total = math.max(g.total_bytes or 1, 1)
  local leased = math.floor((g.leased_bytes or 0) / total * width + 0.5)
  local foreign = math.floor((g.foreign_bytes or 0) / total * width + 0.5)
  local reserve = math.floor((g.reserve_bytes or 0) / total * width + 0.5)
  local used = math.min(width, leased + foreign + reserve)
  return '['
    .. string.rep('#', math.min(leased, width))
    .. string.rep('%', math.max(0, math.min(foreign, width - leased)))
    .. string.rep('r', math.max(0, math.min(reserve, width - leased - foreign)))
    .. string.rep('.', width - used)
    .. ']'
end

-- The status answer as lines of text.
function M.render(st)
  local out = {}
  local function add(s)
    table.insert(out, s)
  end
  add(string.format('SecureLLM  %s  (inventory: %s)', st.up and 'all services up' or 'SOME SERVICES DOWN', tostring(st.inventory)))
  add('')
  add('SERVICES')
  for _, s in ipairs(st.services or {}) do
    if s.up then
      add(string.format('  %-16s %-22s up (%.1f ms)', s.name, s.address, s.latency_ms or 0))
    else
      add(string.format('  %-16s %-22s DOWN (%s)', s.name, s.address, tostring(s.error)))
    end
  end
  add('')
  add('GPUS  (# leased, % foreign, r reserve, . free)')
  if type(st.gpus) == 'table' then
    for _, g in ipairs(st.gpus) do
      add(string.format('  GPU %d %s%s %s', g.index, g.name, g.simulated and ' (simulated)' or '', bar(g, 30)))
      add(string.format('    total %s  leased %s  foreign %s  free %s%s', mib(g.total_bytes), mib(g.leased_bytes), mib(g.foreign_bytes), mib(g.free_bytes), g.overcommitted and '  OVER-COMMITTED' or ''))
    end
  else
    add('  unknown')
  end
  add('')
  add('LEASES')
  if type(st.leases) == 'table' and #st.leases > 0 then
    for _, l in ipairs(st.leases) do
      add(string.format('  %-28s %10s  prio %4d  gpu %d%s%s', l.holder .. (l.label ~= '' and (' (' .. l.label .. ')') or ''), mib(l.bytes), l.priority, l.gpu_index, l.idle and '  idle' or '  busy', l.evict_by_ms ~= vim.NIL and l.evict_by_ms and '  EVICTING' or ''))
    end
  else
    add('  (none)')
  end
  if type(st.queue) == 'table' and #st.queue > 0 then
    add('')
    add('QUEUE')
    for _, q in ipairs(st.queue) do
      add(string.format('  #%d %s (%s) %s prio %d', q.position, q.holder, q.label, mib(q.bytes), q.priority))
    end
  end
  add('')
  add('MODELS')
  if type(st.instances) == 'table' and #st.instances > 0 then
    for _, i in ipairs(st.instances) do
      add(string.format('  %-24s %-9s lease %10s  in flight %d  crashes %d', i.model_name, i.state, mib(i.lease_bytes), i.in_flight, i.crash_count))
    end
  else
    add('  (none loaded)')
  end
  for what, why in pairs(type(st.unknown) == 'table' and st.unknown or {}) do
    add(string.format('  %s unknown: %s', what, why))
  end
  return out
end

-- The last status: { lines, error } (tests read it); the window and its buffer.
M.last = nil

local function float(lines)
  local buf = vim.api.nvim_create_buf(false, true)
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, lines)
  vim.bo[buf].modifiable = false
  vim.bo[buf].bufhidden = 'wipe'
  local width = 20
  for _, l in ipairs(lines) do
    width = math.max(width, vim.fn.strdisplaywidth(l))
  end
  width = math.min(width + 2, math.max(20, vim.o.columns - 4))
  local height = math.min(#lines, math.max(3, vim.o.lines - 4))
  local win = vim.api.nvim_open_win(buf, true, {
    relative = 'editor',
    width = width,
    height = height,
    row = math.max(0, math.floor((vim.o.lines - height) / 2) - 1),
    col = math.max(0, math.floor((vim.o.columns - width) / 2)),
    style = 'minimal',
    border = 'rounded',
  })
  vim.keymap.set('n', 'q', '<cmd>close<cr>', { buffer = buf, nowait = true })
  vim.keymap.set('n', '<Esc>', '<cmd>close<cr>', { buffer = buf, nowait = true })
  return win, buf
end

function M.show(opts)
  opts = opts or {}
  return http.json('GET', '/admin/v1/status', nil, 'admin', function(st, err)
    if err then
      vim.notify('SecureLLM: ' .. err, vim.log.levels.ERROR)
      M.last = { error = err }
    else
      local lines = M.render(st)
      local win, buf = float(lines)
      M.last = { lines = lines, win = win, buf = buf }
    end
    if opts.on_done then
      opts.on_done(M.last)
    end
  end)
end

-- Pick the model from `/v1/models` (the models the key may use); `opts.on_done(model or nil)`.
function M.models(opts)
  opts = opts or {}
  return http.json('GET', '/v1/models', nil, 'api', function(r, err)
    if err then
      vim.notify('SecureLLM: ' .. err, vim.log.levels.ERROR)
      if opts.on_done then
        opts.on_done(nil, err)
      end
      return
    end
    local ids = {}
    for _, m in ipairs(r.data or {}) do
      table.insert(ids, m.id)
    end
    vim.ui.select(ids, {
      prompt = 'SecureLLM model (now: ' .. tostring(config.options.model) .. ')',
    }, function(choice)
      if choice then
        config.options.model = choice
        vim.notify('SecureLLM: model ' .. choice)
      end
      if opts.on_done then
        opts.on_done(choice, nil, ids)
      end
    end)
  end)
end

return M
