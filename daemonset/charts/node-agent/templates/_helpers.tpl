{{/* The labels every object of the mesh's charts carries. Call with (dict "root" $ "app" NAME). */}}
{{- define "node-agent.labels" -}}
app: {{ .app }}
app.kubernetes.io/name: {{ .app }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Values.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The mesh image, <hub>/<image>:<tag>; the tag defaults to the chart's appVersion. */}}
{{- define "node-agent.image" -}}
{{- $tag := .Values.tag | default .Chart.AppVersion -}}
{{- if .Values.hub -}}
{{ printf "%s/%s:%s" .Values.hub .Values.image $tag }}
{{- else -}}
{{ printf "%s:%s" .Values.image $tag }}
{{- end -}}
{{- end }}

{{/* The RBAC rules of files/rbac.yaml: (dict "root" $ "scope" "clusterRules"|"namespaceRules"). */}}
{{- define "node-agent.rules" -}}
{{- $rbac := .root.Files.Get "files/rbac.yaml" | fromYaml -}}
{{- if hasKey $rbac "Error" }}{{ fail (printf "files/rbac.yaml: %s" $rbac.Error) }}{{ end -}}
{{- toYaml (index $rbac .scope) }}
{{- end }}

{{/* redirectMode, checked: a typo must not install an agent that captures nothing. */}}
{{- define "node-agent.redirectMode" -}}
{{- $mode := .Values.redirectMode | toString -}}
{{- if not (has $mode (list "iptables" "ebpf")) -}}
{{- fail (printf "redirectMode must be \"iptables\" or \"ebpf\", not %q" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end }}
