-- Argo CD health check for distillery.dev/DistillationRun (resource.customizations.health.distillery.dev_DistillationRun).
-- Healthy once the run Succeeded, Degraded once it Failed, Progressing otherwise, and Progressing while
-- the operator has not yet acted on the latest spec (status.observedGeneration < metadata.generation).
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick the run up"
  return hs
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local phase = status.phase or "Pending"
if phase == "Succeeded" then
  hs.status = "Healthy"
  local ready = condition(status, "Ready")
  hs.message = (ready ~= nil and ready.message) or status.message or "Succeeded"
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(status, "Failed")
  hs.message = (failed ~= nil and failed.message) or status.message or "Failed"
  return hs
end

hs.status = "Progressing"
local progressing = condition(status, "Progressing")
local message = (progressing ~= nil and progressing.message) or status.message
if message == nil or message == "" then
  message = phase
end
hs.message = message
return hs
