{{/* Names, labels and the pieces every node's pod shares. */}}

{{- define "shard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix for every object; short enough that a stage pod's name
     (<fullname>-stage-<region>-<n>) still fits a DNS label. */}}
{{- define "shard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "shard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shard
{{- end -}}

{{/* Labels of one component: ctx is the root context, component registry|coordinator|stage. */}}
{{- define "shard.componentLabels" -}}
{{ include "shard.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shard.componentSelector" -}}
{{ include "shard.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "shard.clusterDomain" -}}
{{- printf "svc.%s" .Values.clusterDomain -}}
{{- end -}}

{{/* The in-cluster DNS name of a Service: ctx, name. */}}
{{- define "shard.serviceHost" -}}
{{- printf "%s.%s.%s" .name .ctx.Release.Namespace (include "shard.clusterDomain" .ctx) -}}
{{- end -}}

{{/* Every DNS name a Service answers to inside the cluster: ctx, name. */}}
{{- define "shard.serviceDnsNames" -}}
- {{ .name }}
- {{ printf "%s.%s" .name .ctx.Release.Namespace }}
- {{ printf "%s.%s.svc" .name .ctx.Release.Namespace }}
- {{ include "shard.serviceHost" . }}
{{- end -}}

{{/* The DNS SAN naming a node's identity, as shard.wire.certs.Identity.dns_name makes it:
     <id>.<role>.shard.internal. The chart's ids (fixed names, pod names) are lowercase DNS
     labels, the readable form; anything else is refused here rather than mis-encoded. */}}
{{- define "shard.identityDnsName" -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$" .nodeId) -}}
{{- fail (printf "node id %q must be a lowercase DNS label for the chart's certificates" .nodeId) -}}
{{- end -}}
{{- if hasPrefix "x--" .nodeId -}}
{{- fail (printf "node id %q must not start with x--" .nodeId) -}}
{{- end -}}
{{- printf "%s.%s.shard.internal" .nodeId .role -}}
{{- end -}}

{{- define "shard.identityUri" -}}
{{- printf "shard://%s/%s" .role .nodeId -}}
{{- end -}}

{{- define "shard.registryService" -}}
{{- printf "%s-registry" (include "shard.fullname" .) -}}
{{- end -}}

{{- define "shard.coordinatorService" -}}
{{- printf "%s-coordinator" (include "shard.fullname" .) -}}
{{- end -}}

{{/* Where joining nodes dial the registry: registry.address, else its in-cluster Service. */}}
{{- define "shard.registryAddress" -}}
{{- if .Values.registry.address -}}
{{- .Values.registry.address -}}
{{- else if .Values.registry.enabled -}}
{{- printf "%s:%v" (include "shard.serviceHost" (dict "ctx" . "name" (include "shard.registryService" .))) .Values.ports.grpc -}}
{{- else -}}
{{- fail "registry.enabled is false: set registry.address to the registry's HOST:PORT" -}}
{{- end -}}
{{- end -}}

{{- define "shard.deploymentSecretName" -}}
{{- default (printf "%s-deployment-secret" (include "shard.fullname" .)) .Values.deploymentSecret.secretName -}}
{{- end -}}

{{/* The Secret cert-manager writes for a node. */}}
{{- define "shard.tlsSecretName" -}}
{{- printf "%s-tls" . -}}
{{- end -}}

{{/* The certificate folder of a node whose id is fixed (registry, coordinator): its own
     ca.pem, <id>.pem and <id>.key. ctx, nodeId, objectName (the Certificate's name). */}}
{{- define "shard.certsVolume" -}}
- name: certs
{{- if eq .ctx.Values.certificates.source "certManager" }}
  secret:
    secretName: {{ include "shard.tlsSecretName" .objectName }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.pem}
      - {key: tls.crt, path: {{ printf "%s.pem" .nodeId }}}
      - {key: tls.key, path: {{ printf "%s.key" .nodeId }}}
{{- else }}
  secret:
    secretName: {{ required "certificates.existingSecret is required when certificates.source is existingSecret" .ctx.Values.certificates.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The AEAD layer's secret, for the nodes that seal and open frames (coordinator, stages). */}}
{{- define "shard.deploymentSecretVolume" -}}
- name: deployment-secret
  secret:
    secretName: {{ include "shard.deploymentSecretName" . }}
    defaultMode: 0440
    items:
      - {key: deployment.secret, path: deployment.secret}
{{- end -}}

{{- define "shard.deploymentSecretMount" -}}
- {name: deployment-secret, mountPath: /etc/shard/secret, readOnly: true}
{{- end -}}

{{- define "shard.deploymentSecretEnv" -}}
- {name: SHARD_SECRET, value: /etc/shard/secret/deployment.secret}
{{- end -}}

{{/* Volumes every node has: the model and a writable /tmp. */}}
{{- define "shard.commonVolumes" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.init.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* The init container that fills the model volume, when model.source is init. */}}
{{- define "shard.modelInit" -}}
{{- if eq .Values.model.source "init" }}
- name: fetch-model
  image: {{ required "model.init.image is required when model.source is init" .Values.model.init.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- with .Values.model.init.command }}
  command: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.model.init.args }}
  args: {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - {name: MODEL_DIR, value: {{ .Values.model.mountPath | quote }}}
    {{- with .Values.model.init.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  resources: {{- toYaml .Values.model.init.resources | nindent 4 }}
  volumeMounts:
    - {name: model, mountPath: {{ .Values.model.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end -}}

{{- define "shard.volumeMounts" -}}
- {name: certs, mountPath: /etc/shard/certs, readOnly: true}
- {name: model, mountPath: {{ .Values.model.mountPath }}, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* SHARD_* settings every node has; the node-specific ones come from each template. */}}
{{- define "shard.commonEnv" -}}
- {name: SHARD_MODEL, value: {{ trimSuffix "/" (printf "%s/%s" .Values.model.mountPath .Values.model.subPath) | quote }}}
- {name: SHARD_CERTS, value: /etc/shard/certs}
- {name: SHARD_LISTEN, value: {{ printf "%s:%v" .Values.listenHost .Values.ports.grpc | quote }}}
- {name: SHARD_HEALTH_LISTEN, value: {{ printf "%s:%v" .Values.listenHost .Values.ports.health | quote }}}
# torch, transformers and Python keep their caches under a writable HOME.
- {name: HOME, value: /tmp}
{{- with .Values.otel.endpoint }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- if .Values.metrics.scrape }}
- {name: SHARD_METRICS_LISTEN, value: {{ printf "%s:%v" .Values.listenHost .Values.metrics.port | quote }}}
{{- end }}
{{- end -}}

{{/* Pod annotations: values' podAnnotations and, when metrics.scrape, Prometheus's. */}}
{{- define "shard.podAnnotations" -}}
{{- $annotations := deepCopy .Values.podAnnotations -}}
{{- if .Values.metrics.scrape -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .Values.metrics.port) -}}
{{- $_ := set $annotations "prometheus.io/path" .Values.metrics.path -}}
{{- end -}}
{{- with $annotations }}
{{- toYaml . }}
{{- end -}}
{{- end -}}

{{- define "shard.ports" -}}
- {name: grpc, containerPort: {{ .Values.ports.grpc }}, protocol: TCP}
- {name: health, containerPort: {{ .Values.ports.health }}, protocol: TCP}
{{- if .Values.metrics.scrape }}
- {name: metrics, containerPort: {{ .Values.metrics.port }}, protocol: TCP}
{{- end }}
{{- end -}}

{{/* gRPC probes on the plaintext health listener: readiness asks service "" (the node can
     do its job), liveness asks "liveness" (the process and its loop answer); the startup
     probe allows for weight loading. probes: the component's probe settings. */}}
{{- define "shard.probes" -}}
startupProbe:
  grpc: {port: {{ .ctx.Values.ports.health }}, service: liveness}
  periodSeconds: {{ .probes.startup.periodSeconds }}
  failureThreshold: {{ .probes.startup.failureThreshold }}
livenessProbe:
  grpc: {port: {{ .ctx.Values.ports.health }}, service: liveness}
  periodSeconds: {{ .probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .probes.liveness.failureThreshold }}
readinessProbe:
  grpc: {port: {{ .ctx.Values.ports.health }}, service: ""}
  periodSeconds: {{ .probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .probes.readiness.failureThreshold }}
{{- end -}}

{{- define "shard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings every node shares. */}}
{{- define "shard.podSpecCommon" -}}
serviceAccountName: {{ include "shard.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
