{{/* Chart name. */}}
{{- define "repobox.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the prefix of every object name. */}}
{{- define "repobox.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "repobox.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Standard labels. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "repobox.labels" -}}
helm.sh/chart: {{ include "repobox.chart" .ctx }}
app.kubernetes.io/name: {{ include "repobox.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: repobox
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{/* Selector labels of the operator pods. */}}
{{- define "repobox.selectorLabels" -}}
app.kubernetes.io/name: {{ include "repobox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
Labels the operator puts on runner Jobs and pods (operator/src/decide/job_builder.rs: APP_NAME,
MANAGED_BY). The runner NetworkPolicy selects on them.
*/}}
{{- define "repobox.runnerPodSelector" -}}
app.kubernetes.io/name: repobox-job-runner
app.kubernetes.io/managed-by: repobox-operator
{{- end -}}

{{/* Namespaces. */}}
{{- define "repobox.jobsNamespace" -}}
{{- default .Release.Namespace .Values.jobsNamespace -}}
{{- end -}}

{{- define "repobox.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace -}}
{{- end -}}

{{- define "repobox.leaseName" -}}
{{- default (include "repobox.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/* Service accounts. */}}
{{- define "repobox.serviceAccountName" -}}
{{- default (include "repobox.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "repobox.runnerServiceAccountName" -}}
{{- default (printf "%s-runner" (include "repobox.fullname" .)) .Values.runner.serviceAccount.name -}}
{{- end -}}

{{/*
Priority classes: the one given, else the chart's when priorityClasses.create is on, else none.
*/}}
{{- define "repobox.operatorPriorityClassName" -}}
{{- if .Values.priorityClassName -}}
{{- .Values.priorityClassName -}}
{{- else if .Values.priorityClasses.create -}}
{{- default (printf "%s-operator" (include "repobox.fullname" .)) .Values.priorityClasses.operator.name -}}
{{- end -}}
{{- end -}}

{{- define "repobox.runnerPriorityClassName" -}}
{{- if .Values.runner.priorityClassName -}}
{{- .Values.runner.priorityClassName -}}
{{- else if .Values.priorityClasses.create -}}
{{- default (printf "%s-runner" (include "repobox.fullname" .)) .Values.priorityClasses.runner.name -}}
{{- end -}}
{{- end -}}

{{- define "repobox.warmCapacityPriorityClassName" -}}
{{- printf "%s-warm-capacity" (include "repobox.fullname" .) -}}
{{- end -}}

{{/*
A Kubernetes quantity value as a string: "" (and 0, null) stay "" (unset), numbers keep all
their digits (a large whole number would otherwise print as 2.147483648e+09, not a quantity).
*/}}
{{- define "repobox.quantity" -}}
{{- if not . -}}
{{- else if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* Images. */}}
{{- define "repobox.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "repobox.runnerImage" -}}
{{- printf "%s:%s" .Values.runner.image.repository (default .Chart.AppVersion .Values.runner.image.tag) -}}
{{- end -}}

{{/*
Secrets: the name and key of the Redis URL and of the encryption key, either given
(existingSecret) or created by this chart. Rendering fails when neither is given.
*/}}
{{- define "repobox.redisSecretName" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else if .Values.redis.url -}}
{{- printf "%s-redis" (include "repobox.fullname" .) -}}
{{- else -}}
{{- fail "repobox-operator: set redis.url (the chart creates a Secret) or redis.existingSecret (a Secret with the Redis URL under redis.existingSecretKey)" -}}
{{- end -}}
{{- end -}}

{{- define "repobox.redisSecretKey" -}}
{{- if .Values.redis.existingSecret -}}
{{- required "repobox-operator: redis.existingSecretKey must not be empty" .Values.redis.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/*
The runner pods' Redis URL: redis.runner.existingSecret, else a chart-created Secret from
redis.runner.url, else the operator's (same user for both).
*/}}
{{- define "repobox.runnerRedisSeparate" -}}
{{- if or .Values.redis.runner.existingSecret .Values.redis.runner.url -}}true{{- end -}}
{{- end -}}

{{- define "repobox.runnerRedisSecretName" -}}
{{- if .Values.redis.runner.existingSecret -}}
{{- .Values.redis.runner.existingSecret -}}
{{- else if .Values.redis.runner.url -}}
{{- printf "%s-redis-runner" (include "repobox.fullname" .) -}}
{{- else -}}
{{- include "repobox.redisSecretName" . -}}
{{- end -}}
{{- end -}}

{{- define "repobox.runnerRedisSecretKey" -}}
{{- if .Values.redis.runner.existingSecret -}}
{{- required "repobox-operator: redis.runner.existingSecretKey must not be empty" .Values.redis.runner.existingSecretKey -}}
{{- else if .Values.redis.runner.url -}}
url
{{- else -}}
{{- include "repobox.redisSecretKey" . -}}
{{- end -}}
{{- end -}}

{{/*
Checks a Redis URL given as a value: a scheme the operator and the runner accept, and rediss://
when a CA is configured. Argument: (list ctx valueName url).
*/}}
{{- define "repobox.checkRedisUrl" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $url := index . 2 -}}
{{- if not (regexMatch "^(redis|rediss|redis\\+unix|unix|valkey|valkeys)://" $url) -}}
{{- fail (printf "repobox-operator: %s must start with redis://, rediss://, redis+unix:// or unix://" $name) -}}
{{- end -}}
{{- if and $ctx.Values.redis.tls.caSecret (not (regexMatch "^(rediss|valkeys)://" $url)) -}}
{{- fail (printf "repobox-operator: redis.tls.caSecret is set, so %s must be a TLS URL (rediss://)" $name) -}}
{{- end -}}
{{- end -}}

{{/*
Whether a Redis URL carries a password (`scheme://[user]:password@host`, or `?pass=` for a
socket). Argument: the URL. Output: "true" or "".
*/}}
{{- define "repobox.redisUrlHasPassword" -}}
{{- if or (regexMatch "^[a-z+]+://[^/@?#]*:[^/@?#]+@" .) (regexMatch "[?&]pass(word)?=[^&]+" .) -}}true{{- end -}}
{{- end -}}

{{- define "repobox.encryptionKeySecretName" -}}
{{- if .Values.encryptionKey.existingSecret -}}
{{- .Values.encryptionKey.existingSecret -}}
{{- else if .Values.encryptionKey.value -}}
{{- printf "%s-encryption-key" (include "repobox.fullname" .) -}}
{{- else -}}
{{- fail "repobox-operator: set encryptionKey.value (the chart creates a Secret) or encryptionKey.existingSecret (a Secret with the 32-byte key under encryptionKey.existingSecretKey; create one with: kubectl create secret generic repobox-encryption-key --from-literal=key=$(openssl rand -hex 32))" -}}
{{- end -}}
{{- end -}}

{{- define "repobox.encryptionKeySecretKey" -}}
{{- if .Values.encryptionKey.existingSecret -}}
{{- required "repobox-operator: encryptionKey.existingSecretKey must not be empty" .Values.encryptionKey.existingSecretKey -}}
{{- else -}}
key
{{- end -}}
{{- end -}}

{{/*
Namespaces the chart-created Secrets go to: the release namespace (operator) and the jobs
namespace (runner pods).
*/}}
{{- define "repobox.secretNamespaces" -}}
{{- $ns := list .Release.Namespace -}}
{{- $jobs := include "repobox.jobsNamespace" . -}}
{{- if ne $jobs .Release.Namespace -}}
{{- $ns = append $ns $jobs -}}
{{- end -}}
{{- join " " $ns -}}
{{- end -}}

{{/*
The API server's addresses as CIDRs: networkPolicy.apiServer.cidrs, else (autodetect) the
`kubernetes` Service IP and its EndpointSlice addresses, looked up at install time. Offline
(`helm template`) the lookup finds nothing. Output: a JSON list.
*/}}
{{- define "repobox.apiServerCidrs" -}}
{{- $cidrs := list -}}
{{- if .Values.networkPolicy.apiServer.cidrs -}}
{{- $cidrs = .Values.networkPolicy.apiServer.cidrs -}}
{{- else if .Values.networkPolicy.apiServer.autodetect -}}
{{- $svc := lookup "v1" "Service" "default" "kubernetes" -}}
{{- with $svc -}}
{{- range (.spec.clusterIPs | default (list .spec.clusterIP)) -}}
{{- if . -}}
{{- $cidrs = append $cidrs (ternary (printf "%s/128" .) (printf "%s/32" .) (contains ":" .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $slice := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" -}}
{{- with $slice -}}
{{- range .endpoints -}}
{{- range .addresses -}}
{{- $cidrs = append $cidrs (ternary (printf "%s/128" .) (printf "%s/32" .) (contains ":" .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $cidrs | uniq | toJson -}}
{{- end -}}
